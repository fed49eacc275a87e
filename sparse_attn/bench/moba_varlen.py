"""MoBA varlen suite: packed documents of ragged lengths through `moba_attn_varlen`, routing included,
against dense document-causal attention, and the fused packed routing against a per-document loop.

Setup: fp16, H=16 (MHA), D=128, block 128, topk 8 (FlashMoBA's), 128K packed tokens cut at seeded
random points into 32 or 256 documents, so lengths range from a few tokens to tens of thousands.
The tokens are one structured draw of `sparse_attn.testing` cut into documents (RoPE is relative,
so each document keeps its local windows and heavy hitters; a retrieval span cut by a document
boundary is simply lost, as in real packing). FLOPs count the routed pairs of every document.

Timed: `route_fused` (`moba_route_varlen`: one native call for every document) against
`route_per_document` (`moba_route` once per document, what packing cost before the fused op), and
the attention forward and forward + backward with routing. Peers on the same packing: compiled
Flex with a document-causal mask (dense within each document), flash-attn's varlen function when
installed, and SDPA (flash, cuDNN; the CPU's default) looping over the documents. On the CPU the
routed reference (`backend="reference"`) replaces Flex.

Accuracy, on sampled rows of the longest document: the output against the fp64 oracle of the same
routes (FlashAttention's rule) and against fp64 dense causal attention (FlashAttention's rule when
the routes cover every causal pair, else `tolerance`), and the mass recall of the routes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from ..layout import flex_lists
from ..methods.moba import _pairs as _spans
from ..methods.moba import _sequence as _document
from ..methods.moba import moba_attn_varlen, moba_route, moba_route_varlen
from ..testing import structured_qkv
from . import quality
from .common import add_speedup, compiled_flex, dense_peers, flash_attn_function, time_passes, timed
from .moba import routed_pairs

FULL = dict(
    cases=[(131072, 32), (131072, 256)],  # (packed tokens, documents)
    heads=16,
    head_dim=128,
    block=128,
    topk=8,
    dtype=torch.float16,
    error_rows=128,
    tolerance=1.0,
)
QUICK = dict(
    cases=[(512, 4), (512, 16)],
    heads=2,
    head_dim=32,
    block=32,
    topk=3,
    dtype=torch.float32,
    error_rows=128,
    tolerance=1.0,
)
ERROR_RULE = (
    "the longest document's `error_rows` sampled rows. kernel: output vs the fp64 oracle of the same routes, "
    "FlashAttention's rule; vs fp64 dense causal attention within the document: FlashAttention's rule when the "
    "routes hold every causal pair, else relative error <= `tolerance` (1.0 is the error of an all-zero output; "
    "see the moba suite)"
)


def document_offsets(total: int, num_docs: int, seed: int, device) -> torch.Tensor:
    """int32 cu_seqlens [num_docs + 1] over `total` tokens, cut at distinct seeded random points (no empty document)."""
    if not 1 <= num_docs <= total:
        raise ValueError(f"num_docs={num_docs} must be in [1, total={total}]")
    gen = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(total - 1, generator=gen)[: num_docs - 1] + 1).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32).to(device)


def _per_document(attend, spans):
    """A dense peer fn(q, k, v) on (1, H, L, D) run over each document, outputs packed back to (total, H, D)."""

    def run(q, k, v):
        return torch.cat([attend(*(_document(t, span) for t in (q, k, v)))[0].transpose(0, 1) for span in spans])

    return run


def document_block_mask(cu_seqlens: torch.Tensor, total: int, device, block: int = 128):
    """Flex's BlockMask over the packed tokens: each token attends causally within its own document.

    The block lists come from the documents' bounds, as create_block_mask would make them (full blocks
    apart, so Flex skips their mask_mod), but without its dense [total, total] mask (180 GB at 128K)."""
    from torch.nn.attention.flex_attention import BlockMask

    lengths = cu_seqlens.diff().long().to(device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)

    starts = torch.arange(0, total, block, device=device)
    first, last = document[starts], document[(starts + block).clamp(max=total) - 1]  # documents ascend
    q_block, kv_block = torch.arange(len(starts), device=device)[:, None], torch.arange(len(starts), device=device)
    touches = (kv_block <= q_block) & (last[None, :] >= first[:, None])  # some pair shares a document
    # Both blocks inside one document; a ragged last query block stays partial, as create_block_mask has it.
    whole = (starts + block <= total)[:, None]
    full = (kv_block < q_block) & (first[None, :] == last[:, None]) & whole
    lists = [flex_lists(mask[None, None]) for mask in (touches & ~full, full)]
    return BlockMask.from_kv_blocks(
        *lists[0], *lists[1], BLOCK_SIZE=block, mask_mod=document_causal, seq_lengths=(total, total)
    )


def _flex_document(cu_seqlens: torch.Tensor, total: int, device):
    """Compiled Flex on the document-causal mask, packed (total, H, D) in and out. The mask is built at
    the first call, inside the timing's guard: a peer that cannot build it records an error."""
    mask = functools.cache(lambda: document_block_mask(cu_seqlens, total, device))
    flex = compiled_flex()

    def run(q, k, v):  # Flex takes (B, H, S, D)
        return flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask())[0].transpose(0, 1)

    return run


def _peers(device, cu_seqlens, max_len, config) -> dict:
    """Dense document-causal attention (and, on the CPU, the routed reference) on the packed tokens."""
    spans = _spans(cu_seqlens)
    peers = {name: _per_document(attend, spans) for name, attend in dense_peers(device).items() if name != "flash_attn"}
    if device.type != "cuda":
        peers["reference"] = functools.partial(
            _moba, cu_seqlens, max_len, config["block"], config["topk"], backend="reference"
        )
        return peers
    peers["flex_document"] = _flex_document(cu_seqlens, int(cu_seqlens[-1]), device)
    flash_varlen = flash_attn_function("flash_attn_varlen_func")
    if flash_varlen is not None:
        peers["flash_attn"] = lambda q, k, v: flash_varlen(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True
        )
    return peers


def _moba(cu_seqlens, max_len, block, topk, q, k, v, backend="auto"):
    return moba_attn_varlen(q, k, v, cu_seqlens, max_len, block, topk, backend=backend)


def _quality(config, qkv, cu_seqlens, routes) -> dict:
    """The longest document's sampled rows: kernel error on its routes, error and mass recall against dense."""
    lengths = cu_seqlens.diff()
    longest = int(lengths.argmax())
    span = _spans(cu_seqlens)[longest]
    length = span[1] - span[0]
    q, k, v = (_document(t.detach(), span) for t in qkv)
    doc_routes = routes[longest : longest + 1, :, :length]
    rows = quality.sample_rows(length, config["error_rows"], q.device)
    selection = quality.reference(q, k, v, rows, quality.routed_rows(doc_routes, rows, config["block"], length))
    dense = quality.dense_reference(q, k, v, rows)
    max_len = int(lengths.max())
    with torch.no_grad():
        packed = _moba(cu_seqlens, max_len, config["block"], config["topk"], *(t.detach() for t in qkv))
    ours = _document(packed, span)[:, :, rows]
    lossless = routed_pairs(doc_routes, config["block"]) == q.shape[1] * length * (length + 1) // 2
    fields = {"error_document_len": length, **quality.kernel_fields(ours, selection)}
    fields.update(quality.dense_fields(ours, dense, selection, lossless=lossless, tolerance=config["tolerance"]))
    return fields


def _inputs(config, total, device):
    h, d = config["heads"], config["head_dim"]
    made = structured_qkv(1, h, h, total, d, seed=total, device=device)
    qkv = tuple(t[0].transpose(0, 1).contiguous().to(config["dtype"]) for t in (made.q, made.k, made.v))
    grad = torch.randn(
        qkv[0].shape, device=device, dtype=config["dtype"], generator=torch.Generator(device).manual_seed(total)
    )
    return qkv, grad


def _case(config, qkv, grad, cu_seqlens, device) -> dict:
    block, topk = config["block"], config["topk"]
    lengths = cu_seqlens.diff()
    max_len = int(lengths.max())
    heads = qkv[0].shape[1]
    row = {"documents": len(lengths), "max_document_len": max_len, "block": block, "topk": topk}
    q_, k_ = qkv[0].detach(), qkv[1].detach()  # routing takes no gradient
    spans = _spans(cu_seqlens)

    def per_document():
        return [moba_route(_document(q_, s), _document(k_, s), block_size=block, topk=topk) for s in spans]

    def fused():
        return moba_route_varlen(q_, k_, cu_seqlens, cu_seqlens, max_len, block_size=block, topk=topk)

    timed(row, "route_fused", fused, device, peer=False)
    timed(row, "route_per_document", per_document, device, peer=False)
    row["fused_route_speedup"] = row["route_per_document_ms"] / row["route_fused_ms"]
    routes = fused()
    pairs = routed_pairs(routes, block)  # rows past a document's end are -1: they count nothing
    causal_pairs = heads * int((lengths.long() * (lengths.long() + 1) // 2).sum())
    row.update(routed_pairs=pairs, density=pairs / causal_pairs)
    moba = functools.partial(_moba, cu_seqlens, max_len, block, topk)
    time_passes(row, "moba_fwd", "moba_fwd_bwd", moba, qkv, grad, device, pairs, peer=False)
    row["route_share_of_fwd"] = row["route_fused_ms"] / row["moba_fwd_ms"]
    for name, peer in _peers(device, cu_seqlens, max_len, config).items():
        peer_pairs = pairs if name == "reference" else causal_pairs  # the reference computes the routes only
        time_passes(row, f"{name}_fwd", f"{name}_fwd_bwd", peer, qkv, grad, device, peer_pairs)
    row.update(_quality(config, qkv, cu_seqlens, routes))
    return row


def run(config: dict, device: torch.device) -> Iterator[dict]:
    inputs = {}
    for total, num_docs in config["cases"]:
        if total not in inputs:
            inputs[total] = _inputs(config, total, device)
        qkv, grad = inputs[total]
        cu_seqlens = document_offsets(total, num_docs, seed=total + num_docs, device=device)
        row = {"seq_len": total, **_case(config, qkv, grad, cu_seqlens, device)}
        add_speedup(row, "moba_fwd_bwd_ms", "_fwd_bwd_ms")
        if row.get("flex_document_fwd_bwd_ms"):
            row["speedup_over_flex_document"] = row["flex_document_fwd_bwd_ms"] / row["moba_fwd_bwd_ms"]
        yield quality.finish(row)
        print(
            f"{total} tokens in {num_docs} documents: density {row['density']:.3f}, routing fused "
            f"{row['route_fused_ms']:.2f} ms vs per document {row['route_per_document_ms']:.2f} ms, "
            f"moba f+b {row['moba_fwd_bwd_ms']:.2f} ms",
            flush=True,
        )


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"{row['documents']} documents"


SEQ_KEY = "seq_len"
SPEEDUP = (
    "forward + backward, routing included: moba_fwd_bwd_ms vs the fastest dense document-causal peer "
    "(SDPA looping over the documents, flash-attn varlen when installed); Flex with a document mask apart"
)
COLUMNS = [
    ("tokens", "seq_len", "d"),
    ("docs", "documents", "d"),
    ("longest", "max_document_len", "d"),
    ("density", "density", ".3f"),
    ("recall", "mass_recall", ".3f"),
    ("route fused ms", "route_fused_ms", ".2f"),
    ("route per doc ms", "route_per_document_ms", ".2f"),
    ("x fused", "fused_route_speedup", ".1f"),
    ("MoBA fwd ms", "moba_fwd_ms", ".2f"),
    ("MoBA f+b ms", "moba_fwd_bwd_ms", ".2f"),
    ("TFLOP/s f+b", "moba_fwd_bwd_tflops", ".3g"),
    ("Flex doc f+b ms", "flex_document_fwd_bwd_ms", ".2f"),
    ("x Flex doc", "speedup_over_flex_document", ".2f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("kernel err", "kernel_rel_error", ".1e"),
    ("err vs dense", "output_rel_error", ".3f"),
    ("check", "error_ok", "flag"),
]
