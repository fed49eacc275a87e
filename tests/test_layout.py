"""BlockSparseLayout: construction, validation, conversions and the transposed lists."""

import pytest
import torch

from sparse_attn import BlockSparseLayout, causal_block_mask, validate_token_indices
from sparse_attn.layout import causal_full_block_mask, causal_pair_counts
from sparse_attn.reference import causal_token_mask


def random_layout(rng, batch=2, heads=3, seq_q=100, seq_kv=130, q_block=16, kv_block=32, density=0.4):
    mq, n = -(-seq_q // q_block), -(-seq_kv // kv_block)
    mask = torch.rand(batch, heads, mq, n, generator=rng) < density
    layout = BlockSparseLayout.from_dense_mask(
        mask, q_block_size=q_block, kv_block_size=kv_block, seq_len_q=seq_q, seq_len_kv=seq_kv
    )
    return mask, layout


@pytest.mark.parametrize("density", [0.0, 0.25, 1.0])
def test_dense_round_trip(rng, density):
    mask, layout = random_layout(rng, density=density)
    assert layout.kv_num_blocks.dtype == torch.int32 and layout.kv_indices.dtype == torch.int32
    assert torch.equal(layout.to_dense_mask(), mask)
    rebuilt = BlockSparseLayout.from_kv_blocks(
        layout.kv_num_blocks, layout.kv_indices, q_block_size=16, kv_block_size=32, seq_len_q=100, seq_len_kv=130
    )
    assert torch.equal(rebuilt.to_dense_mask(), mask)


def test_transposed_lists(rng):
    mask, layout = random_layout(rng)
    q_counts, q_indices = layout.transposed()
    assert q_counts.shape == (2, 3, layout.num_kv_blocks) and q_indices.shape == (2, 3, layout.num_kv_blocks, 7)
    flipped = BlockSparseLayout.from_kv_blocks(
        q_counts, q_indices, q_block_size=32, kv_block_size=16, seq_len_q=130, seq_len_kv=100
    )
    assert torch.equal(flipped.to_dense_mask(), mask.transpose(-1, -2))
    q2, i2 = flipped.transposed()
    assert torch.equal(q2, layout.kv_num_blocks) and torch.equal(i2, layout.kv_indices)
    assert layout.q_num_blocks is q_counts  # built once
    # ... while the lists stay as they are: an in-place edit of the caller's tensors is seen.
    layout.kv_num_blocks.zero_()
    assert not bool(layout.q_num_blocks.any()) and not bool(layout.transposed()[0].any())
    with torch.inference_mode():
        _, inference = random_layout(rng)
        before = inference.q_num_blocks.clone()
        inference.kv_num_blocks.zero_()  # no version counter here: transposed afresh on every call
        assert before.any() and not bool(inference.q_num_blocks.any())


def test_geometry_and_head_map(rng):
    _, layout = random_layout(rng, heads=2)
    assert (layout.num_q_blocks, layout.num_kv_blocks, layout.causal_offset) == (7, 5, 30)
    assert layout.head_map(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.head_map(2, 1).tolist() == [0, 1]
    _, shared = random_layout(rng, heads=1)
    assert shared.head_map(4, 2).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="heads"):
        layout.head_map(6, 3)
    with pytest.raises(ValueError, match="multiple"):
        layout.head_map(5, 2)


def test_int64_inputs_are_accepted(rng):
    _, layout = random_layout(rng)
    again = BlockSparseLayout.from_kv_blocks(
        layout.kv_num_blocks.long(),
        layout.kv_indices.long(),
        q_block_size=16,
        kv_block_size=32,
        seq_len_q=100,
        seq_len_kv=130,
    )
    assert again.kv_indices.dtype == torch.int32


@pytest.mark.parametrize(
    "counts,indices,error,match",
    [
        (torch.tensor([[[1, 1]]]), torch.tensor([[[[0], [4]]]]), ValueError, "kv_indices entries"),
        (torch.tensor([[[2, 0]]]), torch.tensor([[[[1, 1], [0, 0]]]]), ValueError, "ascending"),
        (torch.tensor([[[2, 0]]]), torch.tensor([[[[2, 1], [0, 0]]]]), ValueError, "ascending"),
        (torch.tensor([[[3, 0]]]), torch.tensor([[[[0, 1], [0, 0]]]]), ValueError, "kv_num_blocks entries"),
        (torch.tensor([[[-1, 0]]]), torch.tensor([[[[0, 1], [0, 0]]]]), ValueError, "kv_num_blocks entries"),
        (torch.tensor([[[1, 1, 1]]]), torch.tensor([[[[0], [0], [0]]]]), ValueError, "query blocks"),
        (torch.tensor([[1, 1]]), torch.tensor([[[0], [0]]]), ValueError, "3-D"),
        (torch.tensor([[[1, 1]]]), torch.tensor([[[0, 0]]]), ValueError, "4-D"),
        (torch.tensor([[[1, 1]]]), torch.tensor([[[[0], [0]], [[0], [0]]]]), ValueError, "leading shape"),
        (torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[[0], [0]]]]), TypeError, "kv_num_blocks"),
    ],
)
def test_from_kv_blocks_rejects_bad_lists(counts, indices, error, match):
    # Two query blocks of 8 over 16 queries; four KV blocks of 8 over 32 keys.
    with pytest.raises(error, match=match):
        BlockSparseLayout.from_kv_blocks(counts, indices, q_block_size=8, kv_block_size=8, seq_len_q=16, seq_len_kv=32)


def test_bad_sizes_and_masks():
    counts, indices = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    for name in ("q_block_size", "kv_block_size", "seq_len_q", "seq_len_kv"):
        kwargs = dict(q_block_size=8, kv_block_size=8, seq_len_q=16, seq_len_kv=16)
        kwargs[name] = 0
        with pytest.raises(ValueError, match=name):
            BlockSparseLayout.from_kv_blocks(counts, indices, **kwargs)
        kwargs[name] = 8.0
        with pytest.raises(TypeError, match=name):
            BlockSparseLayout.from_kv_blocks(counts, indices, **kwargs)
    with pytest.raises(TypeError, match="bool"):
        BlockSparseLayout.from_dense_mask(
            torch.ones(1, 1, 2, 2), q_block_size=8, kv_block_size=8, seq_len_q=16, seq_len_kv=16
        )
    # A mask wider than the KV blocks once passed and named blocks past the keys.
    for columns in (1, 3, 5):
        with pytest.raises(ValueError, match="KV-block columns"):
            BlockSparseLayout.from_dense_mask(
                torch.ones(1, 1, 2, columns, dtype=torch.bool),
                q_block_size=8,
                kv_block_size=8,
                seq_len_q=16,
                seq_len_kv=16,
            )
    with pytest.raises(ValueError, match="outside int32"):  # int64 lists once wrapped silently (2**32 + 1 -> 1)
        BlockSparseLayout.from_kv_blocks(
            torch.tensor([[[1, 1]]]),
            torch.tensor([[[[2**32 + 1], [0]]]]),
            q_block_size=8,
            kv_block_size=8,
            seq_len_q=16,
            seq_len_kv=16,
        )
    for args, name in (
        ((16, 16, 0, 8), "q_block_size"),
        ((16, 16, 8, -1), "kv_block_size"),
        ((-5, 16, 8, 8), "seq_len_q"),
    ):
        with pytest.raises(ValueError, match=name):
            causal_block_mask(*args)
    with pytest.raises(ValueError, match="query blocks"):
        BlockSparseLayout.from_dense_mask(
            torch.ones(1, 1, 3, 2, dtype=torch.bool), q_block_size=8, kv_block_size=8, seq_len_q=16, seq_len_kv=16
        )


@pytest.mark.parametrize(
    "seq_q,seq_kv,qb,kb", [(64, 64, 16, 16), (40, 100, 16, 32), (7, 300, 16, 64), (100, 100, 32, 16)]
)
def test_causal_block_mask_matches_tokens(seq_q, seq_kv, qb, kb):
    tokens = causal_token_mask(seq_q, seq_kv)
    mq, n = -(-seq_q // qb), -(-seq_kv // kb)
    padded = torch.zeros(mq * qb, n * kb, dtype=torch.bool)
    padded[:seq_q, :seq_kv] = tokens
    expected = padded.view(mq, qb, n, kb).any(dim=3).any(dim=1)
    assert torch.equal(causal_block_mask(seq_q, seq_kv, qb, kb), expected)


def test_density_and_compatibility(rng):
    mq = 4
    causal = causal_block_mask(64, 64, 16, 16)
    layout = BlockSparseLayout.from_dense_mask(
        causal.expand(1, 2, mq, mq).clone(), q_block_size=16, kv_block_size=16, seq_len_q=64, seq_len_kv=64
    )
    assert layout.density() == 1.0
    everything = BlockSparseLayout.from_dense_mask(
        torch.ones(1, 2, mq, mq, dtype=torch.bool), q_block_size=16, kv_block_size=16, seq_len_q=64, seq_len_kv=64
    )
    assert everything.density() == 1.0  # blocks wholly in the future are never computed: not counted
    assert everything.density(causal=False) == 1.0
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    layout.check_compatible(q, k)
    with pytest.raises(ValueError, match="seq_len"):
        layout.check_compatible(q[:, :, :32], k)


def test_validate_token_indices():
    good = torch.tensor([[[[0, 3, -1]], [[1, -1, -1]]]])
    assert validate_token_indices(good, batch=1, seq_len_q=2, num_kv_heads=2, seq_len_kv=4).dtype == torch.int32
    with pytest.raises(ValueError, match="indices entries"):
        validate_token_indices(good + 2, batch=1, seq_len_q=2, num_kv_heads=2, seq_len_kv=4)
    with pytest.raises(ValueError, match="KV heads"):
        validate_token_indices(good.expand(1, 2, 3, 3), batch=1, seq_len_q=2, num_kv_heads=2, seq_len_kv=4)
    with pytest.raises(TypeError, match="indices"):
        validate_token_indices(good.float(), batch=1, seq_len_q=2, num_kv_heads=2, seq_len_kv=4)


@pytest.mark.parametrize(
    "seq_q,seq_kv,qb,kb", [(64, 64, 16, 16), (40, 100, 16, 32), (100, 100, 32, 16), (50, 30, 16, 16)]
)
def test_pair_counts_and_full_blocks_match_tokens(seq_q, seq_kv, qb, kb):
    tokens = causal_token_mask(seq_q, seq_kv)
    mq, n = -(-seq_q // qb), -(-seq_kv // kb)
    padded = torch.zeros(mq * qb, n * kb, dtype=torch.long)
    padded[:seq_q, :seq_kv] = tokens
    expected = padded.view(mq, qb, n, kb).sum(dim=(1, 3))
    assert torch.equal(causal_pair_counts(seq_q, seq_kv, qb, kb), expected)
    real = torch.zeros_like(padded)
    real[:seq_q, :seq_kv] = 1
    block_size = real.view(mq, qb, n, kb).sum(dim=(1, 3))
    assert torch.equal(causal_full_block_mask(seq_q, seq_kv, qb, kb), expected == block_size)
    assert torch.equal(causal_pair_counts(seq_q, seq_kv, qb, kb, causal=False), block_size)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_mask_mod_is_the_selection(rng, causal, seq_q=40, seq_kv=93):
    """Eager Flex reads only the mask_mod (not the block lists): it must be the whole selection, with
    ragged last blocks on both axes."""
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_attn.reference import block_sparse_attention_reference

    mask = torch.rand(2, 2, -(-seq_q // 16), -(-seq_kv // 32), generator=rng) < 0.5
    mask[..., -1] = True  # every row keeps a block it can see (the reference and Flex differ on empty rows)
    layout = BlockSparseLayout.from_dense_mask(
        mask, q_block_size=16, kv_block_size=32, seq_len_q=seq_q, seq_len_kv=seq_kv
    )
    q = torch.randn(2, 4, seq_q, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(2, 2, seq_kv, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    block_mask = layout.to_flex_block_mask(4, 2, causal=causal)
    out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref, _ = block_sparse_attention_reference(q, k, v, layout, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_flex_block_mask_is_an_independent_oracle(rng, seq_q=40, seq_kv=96):
    # Compiled Flex: it walks the block lists (full ones without the mask_mod), where eager Flex reads
    # only the mask_mod (test_flex_mask_mod_is_the_selection).
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_attn.reference import block_sparse_attention_reference

    mask = torch.rand(2, 2, -(-seq_q // 16), -(-seq_kv // 16), generator=rng) < 0.6
    mask[..., 0] = True  # every row keeps a block: Flex and the reference differ only on empty rows
    layout = BlockSparseLayout.from_dense_mask(
        mask, q_block_size=16, kv_block_size=16, seq_len_q=seq_q, seq_len_kv=seq_kv
    )
    q = torch.randn(2, 4, seq_q, 16, generator=rng)
    k, v = torch.randn(2, 2, seq_kv, 16, generator=rng), torch.randn(2, 2, seq_kv, 16, generator=rng)
    block_mask = layout.to_flex_block_mask(4, 2)
    out = torch.compile(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref, _ = block_sparse_attention_reference(q, k, v, layout)
    visible = ref.abs().sum(-1) > 0
    torch.testing.assert_close(out[visible].double(), ref[visible], rtol=1e-4, atol=1e-4)
    token_mask = layout.to_dense_mask()[:, layout.head_map(4, 2)].repeat_interleave(16, 2).repeat_interleave(16, 3)
    allowed = token_mask[:, :, :seq_q, :seq_kv] & causal_token_mask(seq_q, seq_kv)
    assert layout.computed_pairs(4, 2) == int(allowed.sum())
