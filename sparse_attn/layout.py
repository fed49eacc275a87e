"""Block-sparse layouts shared by every method and by the attention engine.

`BlockSparseLayout` follows FlexAttention's `BlockMask` convention: per (batch, head, query block)
a count of selected KV blocks and their indices, `kv_num_blocks` int32 [B, H, Mq] and
`kv_indices` int32 [B, H, Mq, Nmax]. Only the first `count` entries of a row are read; they must
ascend strictly. Constructors here write -1 into the unused slots.

Query blocks are anchored at query 0 and KV blocks at key 0. When `seq_len_q < seq_len_kv`,
causality is bottom-right aligned: query i sits at key position i + seq_len_kv - seq_len_q.

The head dimension H is the number of query heads, the number of KV heads (shared by the query
heads of a GQA group) or 1 (shared by all heads); see `head_map`.

Token-level selections (HISA, S2O) use int32 [B, Sq, G, K] key indices padded with -1, where G is
the number of KV heads or 1; see `validate_token_indices`.
"""

from __future__ import annotations

import torch

from . import selection
from .reference import _kv_lists_to_dense, _mask_to_sorted_lists
from .selection import _check_bool, _check_int

__all__ = [
    "BlockSparseLayout",
    "causal_block_mask",
    "causal_full_block_mask",
    "causal_pair_counts",
    "sink_and_diagonal_blocks",
    "validate_token_indices",
]


def _as_int32(tensor, name: str, *, check_range: bool = True) -> torch.Tensor:
    """`tensor` as contiguous int32; `check_range` (a device sync) rejects int64 values that int32 would wrap."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (int32 preferred), got {tensor.dtype}")
    if check_range and tensor.dtype == torch.int64 and tensor.numel():
        info = torch.iinfo(torch.int32)
        if bool(((tensor < info.min) | (tensor > info.max)).any()):
            raise ValueError(f"{name} holds values outside int32")
    return tensor.to(torch.int32).contiguous()  # the kernels read each list's last axis contiguously


def _block_bounds(seq_len: int, block_size: int, device):
    starts = torch.arange(0, seq_len, block_size, device=device)
    return starts, torch.clamp(starts + block_size, max=seq_len) - 1


def _check_block_geometry(seq_len_q, seq_len_kv, q_block_size, kv_block_size) -> None:
    for name, value in (("seq_len_q", seq_len_q), ("seq_len_kv", seq_len_kv)):
        _check_int(value, name, 0)
    for name, value in (("q_block_size", q_block_size), ("kv_block_size", kv_block_size)):
        _check_int(value, name, 1)


def causal_block_mask(seq_len_q: int, seq_len_kv: int, q_block_size: int, kv_block_size: int, device=None):
    """Bool [Mq, N]: blocks holding at least one causally visible (query, key) pair, bottom-right aligned."""
    _check_block_geometry(seq_len_q, seq_len_kv, q_block_size, kv_block_size)
    _, last_query = _block_bounds(seq_len_q, q_block_size, device)
    kv_starts, _ = _block_bounds(seq_len_kv, kv_block_size, device)
    return kv_starts[None, :] <= (last_query + seq_len_kv - seq_len_q)[:, None]


def sink_and_diagonal_blocks(seq_len_q: int, seq_len_kv: int, block_size: int, device=None):
    """Bool [Mq, N]: key block 0 and every key block holding the (bottom-right aligned) position of a
    real query of the row: the blocks that causal block selections always keep."""
    _check_block_geometry(seq_len_q, seq_len_kv, block_size, block_size)
    first_query, last_query = _block_bounds(seq_len_q, block_size, device)
    kv_starts, _ = _block_bounds(seq_len_kv, block_size, device)
    kv_block = torch.arange(len(kv_starts), device=device)
    offset = seq_len_kv - seq_len_q
    forced = (kv_block[None, :] >= ((first_query + offset) // block_size)[:, None]) & (
        kv_block[None, :] <= ((last_query + offset) // block_size)[:, None]
    )
    forced[:, 0] = True
    return forced


def selectable_blocks(seq_len_q: int, seq_len_kv: int, block_size: int, causal: bool, device=None):
    """(allowed, forced) bool [Mq, N] of a block selection: with `causal`, the causally visible blocks with
    the sink and the diagonal forced; without, every block allowed and none forced."""
    if causal:
        allowed = causal_block_mask(seq_len_q, seq_len_kv, block_size, block_size, device)
        return allowed, sink_and_diagonal_blocks(seq_len_q, seq_len_kv, block_size, device)
    _check_block_geometry(seq_len_q, seq_len_kv, block_size, block_size)
    shape = (-(-seq_len_q // block_size), -(-seq_len_kv // block_size))
    return torch.ones(shape, dtype=torch.bool, device=device), torch.zeros(shape, dtype=torch.bool, device=device)


def causal_full_block_mask(seq_len_q: int, seq_len_kv: int, q_block_size: int, kv_block_size: int, device=None):
    """Bool [Mq, N]: blocks whose every (query, key) pair is causally visible (no token mask needed)."""
    _check_block_geometry(seq_len_q, seq_len_kv, q_block_size, kv_block_size)
    q_starts, _ = _block_bounds(seq_len_q, q_block_size, device)
    _, last_key = _block_bounds(seq_len_kv, kv_block_size, device)
    return last_key[None, :] <= (q_starts + seq_len_kv - seq_len_q)[:, None]


def causal_pair_counts(
    seq_len_q: int, seq_len_kv: int, q_block_size: int, kv_block_size: int, causal=True, device=None
):
    """int64 [Mq, N]: the number of (query, key) pairs each block computes (for FLOP counts)."""
    _check_block_geometry(seq_len_q, seq_len_kv, q_block_size, kv_block_size)
    _check_bool(causal, "causal")
    q_starts, q_last = _block_bounds(seq_len_q, q_block_size, device)
    kv_starts, kv_last = _block_bounds(seq_len_kv, kv_block_size, device)
    if not causal:
        return (q_last - q_starts + 1)[:, None] * (kv_last - kv_starts + 1)[None, :]
    # Query i sees clamp(i + offset - start_n + 1, 0, len_n) keys of block n; sum that over the
    # query block in closed form with the prefix sums F(t) of x -> clamp(x, 0, L).
    lengths = (kv_last - kv_starts + 1)[None, :]

    def prefix(t):
        t = t.clamp(min=0)
        inside = torch.minimum(t, lengths)
        return inside * (inside + 1) // 2 + (t - inside) * lengths

    shift = seq_len_kv - seq_len_q - kv_starts[None, :] + 1
    return prefix(q_last[:, None] + shift) - prefix(q_starts[:, None] - 1 + shift)


def tensor_versions(*tensors) -> tuple | None:
    """Autograd's version counters (every in-place write bumps them), or None when one is an inference
    tensor (they keep none): how a cache derived from tensors notices they were edited."""
    return None if any(t.is_inference() for t in tensors) else tuple(t._version for t in tensors)


def flex_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, ascending indices) of a bool block mask [B, H, Mq, N], as FlexAttention's
    `BlockMask.from_kv_blocks` takes them (padding entries 0, not -1)."""
    counts, indices = _mask_to_sorted_lists(mask)
    return counts, indices.clamp(min=0)


class BlockSparseLayout:
    """Selected KV blocks per (batch, head, query block); build it with `from_kv_blocks` or `from_dense_mask`."""

    def __init__(self, kv_num_blocks, kv_indices, q_block_size, kv_block_size, seq_len_q, seq_len_kv):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.q_block_size = q_block_size
        self.kv_block_size = kv_block_size
        self.seq_len_q = seq_len_q
        self.seq_len_kv = seq_len_kv
        self._transposed, self._transposed_key = None, None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_kv_blocks(
        cls, kv_num_blocks, kv_indices, *, q_block_size, kv_block_size, seq_len_q, seq_len_kv, validate=True
    ):
        """Wrap FlexAttention-style KV block lists. `validate=False` skips the checks that sync the GPU."""
        q_block_size = _check_int(q_block_size, "q_block_size", 1)
        kv_block_size = _check_int(kv_block_size, "kv_block_size", 1)
        seq_len_q = _check_int(seq_len_q, "seq_len_q", 1)
        seq_len_kv = _check_int(seq_len_kv, "seq_len_kv", 1)
        kv_num_blocks = _as_int32(kv_num_blocks, "kv_num_blocks", check_range=validate)
        kv_indices = _as_int32(kv_indices, "kv_indices", check_range=validate)
        layout = cls(kv_num_blocks, kv_indices, q_block_size, kv_block_size, seq_len_q, seq_len_kv)
        layout._check_shapes()
        if validate:
            layout._check_contents()
        return layout

    @classmethod
    def from_dense_mask(cls, mask, *, q_block_size, kv_block_size, seq_len_q, seq_len_kv):
        """Build from a bool block mask [B, H, Mq, N] (True = attend to that KV block)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.dim() != 4:
            raise ValueError(f"mask must be 4-D [B, H, Mq, N], got shape {tuple(mask.shape)}")
        num_kv_blocks = -(-_check_int(seq_len_kv, "seq_len_kv", 1) // _check_int(kv_block_size, "kv_block_size", 1))
        if mask.shape[3] != num_kv_blocks:
            raise ValueError(
                f"mask has {mask.shape[3]} KV-block columns, but seq_len_kv={seq_len_kv} with "
                f"kv_block_size={kv_block_size} needs {num_kv_blocks}"
            )
        kv_num_blocks, kv_indices = _mask_to_sorted_lists(mask)
        return cls.from_kv_blocks(
            kv_num_blocks,
            kv_indices,
            q_block_size=q_block_size,
            kv_block_size=kv_block_size,
            seq_len_q=seq_len_q,
            seq_len_kv=seq_len_kv,
            validate=False,
        )

    # ----------------------------------------------------------------- geometry
    @property
    def batch_size(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_len_q // self.q_block_size)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_len_kv // self.kv_block_size)

    @property
    def causal_offset(self) -> int:
        """Key position of query 0 under bottom-right causal alignment."""
        return self.seq_len_kv - self.seq_len_q

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def head_map(self, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
        """For each query head, the layout head it reads (int64 [num_q_heads] on the layout's device)."""
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        heads = torch.arange(num_q_heads, device=self.device)
        if self.num_heads == num_q_heads:
            return heads
        if self.num_heads == num_kv_heads:
            return heads // (num_q_heads // num_kv_heads)
        if self.num_heads == 1:
            return torch.zeros_like(heads)
        raise ValueError(
            f"layout has {self.num_heads} heads; expected the query heads ({num_q_heads}), "
            f"the KV heads ({num_kv_heads}) or 1"
        )

    def check_compatible(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise ValueError unless the layout fits q (B, Hq, Sq, D) and k (B, Hkv, Skv, D)."""
        if self.batch_size not in (q.shape[0], 1):
            raise ValueError(f"layout batch {self.batch_size} does not match q batch {q.shape[0]}")
        if (self.seq_len_q, self.seq_len_kv) != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"layout is for seq_len_q={self.seq_len_q}, seq_len_kv={self.seq_len_kv}; "
                f"got q length {q.shape[2]} and k length {k.shape[2]}"
            )
        if self.device != q.device:
            raise ValueError(f"layout is on {self.device} but q is on {q.device}")
        self.head_map(q.shape[1], k.shape[1])

    # ----------------------------------------------------------------- conversions
    def to_dense_mask(self) -> torch.Tensor:
        """Bool [B, H, Mq, N] block mask."""
        return _kv_lists_to_dense(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)

    def transposed(self):
        """(q_num_blocks [B, H, N], q_indices [B, H, N, Mq]): for each KV block the query blocks that read it.

        Built once on the layout's device (the backward pass walks KV blocks)."""
        lists = (self.kv_num_blocks, self.kv_indices)
        # Kept while the lists are the same, unedited tensors (inference tensors keep no versions, so theirs
        # are transposed afresh on every call).
        versions = tensor_versions(*lists)
        key = None if versions is None else (tuple(map(id, lists)), versions)
        if self._transposed is None or key is None or key != self._transposed_key:
            self._transposed = selection.layout_transpose(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)
            self._transposed_key = key
        return self._transposed

    @property
    def q_num_blocks(self) -> torch.Tensor:
        return self.transposed()[0]

    @property
    def q_indices(self) -> torch.Tensor:
        return self.transposed()[1]

    def to(self, device) -> BlockSparseLayout:
        return BlockSparseLayout(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.q_block_size,
            self.kv_block_size,
            self.seq_len_q,
            self.seq_len_kv,
        )

    def to_flex_block_mask(self, num_q_heads: int, num_kv_heads: int, *, causal: bool = True):
        """The same selection as a FlexAttention `BlockMask` (for the benchmark peer and as an oracle).

        Causally partial blocks go to the masked lists; fully visible blocks go to the full lists,
        which compiled Flex runs without the mask. The `mask_mod` is the whole selection (the block
        lookup, and bottom-right causality): eager Flex reads only it. Heads expand to Hq.
        """
        from torch.nn.attention.flex_attention import BlockMask

        _check_bool(causal, "causal")
        selected = self.to_dense_mask()[:, self.head_map(num_q_heads, num_kv_heads)]
        last_q_block, last_kv_block = selected.shape[2] - 1, selected.shape[3] - 1
        offset = self.causal_offset

        def mask_mod(b, h, q_idx, kv_idx):
            # Clamped: Flex may evaluate the padding rows and columns of a ragged last block.
            q_block = (q_idx // self.q_block_size).clamp(max=last_q_block)
            kv_block = (kv_idx // self.kv_block_size).clamp(max=last_kv_block)
            chosen = selected[b if selected.shape[0] > 1 else 0, h, q_block, kv_block]
            return chosen & (kv_idx <= q_idx + offset) if causal else chosen

        if causal:
            args = (self.seq_len_q, self.seq_len_kv, self.q_block_size, self.kv_block_size, self.device)
            full = selected & causal_full_block_mask(*args)
            partial = selected & causal_block_mask(*args) & ~full
        else:
            full, partial = selected, torch.zeros_like(selected)
        return BlockMask.from_kv_blocks(
            *flex_lists(partial),
            *flex_lists(full),
            BLOCK_SIZE=(self.q_block_size, self.kv_block_size),
            mask_mod=mask_mod,
            seq_lengths=(self.seq_len_q, self.seq_len_kv),
        )

    def computed_pairs(self, num_q_heads: int, num_kv_heads: int, *, causal: bool = True) -> int:
        """(query, key) pairs computed over all query heads and the layout's batch entries.

        Forward FLOPs are 4 * D * pairs (QK^T and PV); a broadcast batch counts once."""
        pairs = causal_pair_counts(
            self.seq_len_q, self.seq_len_kv, self.q_block_size, self.kv_block_size, causal=causal, device=self.device
        )
        selected = self.to_dense_mask()[:, self.head_map(num_q_heads, num_kv_heads)]
        return int((selected * pairs).sum().item())

    def density(self, causal: bool = True) -> float:
        """Selected blocks over available blocks (the causally visible ones when `causal`, which count only the
        selected blocks they hold: a block wholly in the future is never computed)."""
        _check_bool(causal, "causal")
        selected = self.kv_num_blocks.sum().item()
        if causal:
            visible = causal_block_mask(
                self.seq_len_q, self.seq_len_kv, self.q_block_size, self.kv_block_size, device=self.device
            )
            selected = (self.to_dense_mask() & visible).sum().item()
            available = visible.sum().item() * self.batch_size * self.num_heads
        else:
            available = self.kv_num_blocks.numel() * self.num_kv_blocks
        return selected / max(available, 1)

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(batch={self.batch_size}, heads={self.num_heads}, "
            f"q_blocks={self.num_q_blocks}x{self.q_block_size}, kv_blocks={self.num_kv_blocks}x{self.kv_block_size}, "
            f"seq_len_q={self.seq_len_q}, seq_len_kv={self.seq_len_kv}, device={self.device})"
        )

    # ----------------------------------------------------------------- validation
    def _check_shapes(self) -> None:
        counts, indices = self.kv_num_blocks, self.kv_indices
        if counts.dim() != 3:
            raise ValueError(f"kv_num_blocks must be 3-D [B, H, Mq], got shape {tuple(counts.shape)}")
        if indices.dim() != 4:
            raise ValueError(f"kv_indices must be 4-D [B, H, Mq, Nmax], got shape {tuple(indices.shape)}")
        if indices.shape[:3] != counts.shape:
            raise ValueError(
                f"kv_indices leading shape {tuple(indices.shape[:3])} must equal "
                f"kv_num_blocks shape {tuple(counts.shape)}"
            )
        if counts.device != indices.device:
            raise ValueError(f"kv_num_blocks is on {counts.device} but kv_indices is on {indices.device}")
        if counts.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_num_blocks has {counts.shape[2]} query blocks, but seq_len_q={self.seq_len_q} with "
                f"q_block_size={self.q_block_size} needs {self.num_q_blocks}"
            )

    def _check_contents(self) -> None:
        counts, indices = self.kv_num_blocks, self.kv_indices
        nmax, n_blocks = indices.shape[-1], self.num_kv_blocks
        if bool(((counts < 0) | (counts > nmax)).any()):
            raise ValueError(f"kv_num_blocks entries must lie in [0, {nmax}] (the width of kv_indices)")
        used = torch.arange(nmax, device=indices.device) < counts[..., None]
        if bool((used & ((indices < 0) | (indices >= n_blocks))).any()):
            raise ValueError(f"kv_indices entries in use must lie in [0, {n_blocks}) (the number of KV blocks)")
        steps_used = used[..., 1:]
        if bool((steps_used & (indices[..., 1:] <= indices[..., :-1])).any()):
            raise ValueError("kv_indices rows must be sorted in strictly ascending order (no duplicates)")


def validate_token_indices(
    indices: torch.Tensor, *, batch: int, seq_len_q: int, num_kv_heads: int, seq_len_kv: int, name: str = "indices"
) -> torch.Tensor:
    """Check int [B, Sq, G, K] token selections (G = num_kv_heads or 1, -1 padding); returns them as int32."""
    indices = _as_int32(indices, name)
    if indices.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, Sq, G, K], got shape {tuple(indices.shape)}")
    b, sq, groups, _ = indices.shape
    if (b, sq) != (batch, seq_len_q):
        raise ValueError(f"{name} must start with [B={batch}, Sq={seq_len_q}], got {tuple(indices.shape[:2])}")
    if groups not in (num_kv_heads, 1):
        raise ValueError(f"{name} dim 2 must be the number of KV heads ({num_kv_heads}) or 1, got {groups}")
    if bool(((indices < -1) | (indices >= seq_len_kv)).any()):
        raise ValueError(f"{name} entries must lie in [0, {seq_len_kv}) or be -1 (padding)")
    return indices
