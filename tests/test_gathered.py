"""The PyTorch paths (`backend='torch'`, the default where Triton does not run) against the fp64
oracles, with FlashAttention's error rule, and their memory bounds: the engine's gathered blocks
(`sparse_attn.gathered`) and MoBA's gather-and-densify (`sparse_attn.routed_torch`)."""

import zlib

import pytest
import torch

from sparse_attn import (
    BlockSparseLayout,
    block_sparse_attn,
    block_sparse_attn_varlen,
    engine,
    gathered,
    moba_attn,
    moba_attn_varlen,
    routed_torch,
)
from sparse_attn.methods.moba import moba_attention_reference, moba_route
from sparse_attn.reference import block_sparse_attention_reference
from sparse_attn.testing import assert_flash_rule, max_err, random_block_layout


def make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype):
    shapes = ((batch, hq, seq_q, dim), (batch, hkv, seq_kv, dim), (batch, hkv, seq_kv, dim))
    return [torch.randn(s, generator=rng).to(dtype).requires_grad_() for s in shapes]


def check_rule(attention, oracle, q, k, v, *, differentiate_lse):
    """`attention(q, k, v)` -> (out, lse) against `oracle(q, k, v, compute_dtype)` -> (out, lse)."""
    out, lse = attention(q, k, v)
    ref_out, ref_lse = oracle(q, k, v, torch.float64)
    same_out, same_lse = oracle(q, k, v, q.dtype)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_flash_rule(out, ref_out, same_out, 2, "output")
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert bool((out[empty] == 0).all())
    assert max_err(lse[~empty], ref_lse[~empty]) < 1e-4
    with torch.no_grad():  # inference may take another route (the engine broadcasts GQA heads)
        inference_out, inference_lse = attention(q, k, v)
    assert_flash_rule(inference_out, ref_out, same_out, 2, "inference output")
    assert torch.equal(torch.isneginf(inference_lse), empty)

    grad = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if differentiate_lse else None

    def loss(o, lse_):
        total = (o * grad.to(o.dtype)).sum()
        if grad_lse is not None:  # finite entries only: empty rows have LSE -inf
            total = total + (torch.where(empty, 0, lse_) * grad_lse.to(lse_.dtype)).sum()
        return total

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    same_grads = torch.autograd.grad(loss(same_out, same_lse), (q, k, v))
    for name, g, r, s in zip("qkv", grads, ref_grads, same_grads):
        assert not torch.isnan(g).any(), f"d{name} has NaN"
        assert_flash_rule(g, r, s, 3, f"d{name}")


ENGINE_CASES = {
    # batch, Hq, Hkv, layout heads, Sq, Skv, q block, kv block, density, causal
    "mha_ragged": (2, 2, 2, "q", 70, 70, 16, 16, 0.4, True),
    "gqa4_per_kv_head": (1, 8, 2, "kv", 64, 64, 16, 16, 0.5, True),
    "gqa2_shared_layout": (2, 4, 2, "one", 48, 48, 16, 32, 0.5, False),
    "gqa2_per_q_head_q_shorter": (1, 4, 2, "q", 37, 100, 16, 32, 0.5, True),
    "unequal_blocks_empty_rows": (1, 3, 1, "q", 50, 50, 8, 16, 0.15, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("differentiate_lse", [False, True], ids=["flash_kernel", "lse_grad"])
@pytest.mark.parametrize("case", list(ENGINE_CASES), ids=list(ENGINE_CASES))
def test_engine_matches_oracle(case, differentiate_lse, dtype):
    batch, hq, hkv, heads, seq_q, seq_kv, q_block, kv_block, density, causal = ENGINE_CASES[case]
    rng = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    layout_heads = {"q": hq, "kv": hkv, "one": 1}[heads]
    layout = random_block_layout(batch, layout_heads, seq_q, seq_kv, q_block, kv_block, density, causal=causal, seed=3)
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, 32, dtype)

    def oracle(q_, k_, v_, compute):
        return block_sparse_attention_reference(q_, k_, v_, layout, causal=causal, compute_dtype=compute)

    check_rule(engine_path(layout, causal, differentiate_lse), oracle, q, k, v, differentiate_lse=differentiate_lse)


def engine_path(layout, causal, differentiate_lse):
    """The engine's PyTorch path as (out, lse). A differentiable LSE takes the plain-op softmax, so
    without one the LSE comes from an inference call: the output and its gradients then come from
    the CPU flash kernel, as they do for a caller that does not ask for the LSE."""

    def attention(q, k, v):
        if differentiate_lse or not torch.is_grad_enabled():
            return block_sparse_attn(q, k, v, layout, causal=causal, return_lse=True, backend="torch")
        out = block_sparse_attn(q, k, v, layout, causal=causal, backend="torch")
        with torch.no_grad():
            return out, block_sparse_attn(q, k, v, layout, causal=causal, return_lse=True, backend="torch")[1]

    return attention


def record_tile_lists(monkeypatch):
    """Spy on `gathered._kv_head_lists`: the (lists, members) it returned, one entry per call."""
    seen = []
    real = gathered._kv_head_lists

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(gathered, "_kv_head_lists", spy)
    return seen


@pytest.mark.parametrize("differentiate_lse", [False, True], ids=["flash_kernel", "lse_grad"])
@pytest.mark.parametrize("gather_cost_rows, union", [(0, False), (10**9, True)], ids=["per_head", "group_union"])
def test_lists_per_query_head_as_a_group_union(monkeypatch, gather_cost_rows, union, differentiate_lse):
    """GQA lists per query head run per head, or as one union per KV head (one gather) with each
    head masked to its own blocks; the cost model picks. Both must match the oracle, empty rows,
    a ragged end and bottom-right causality included."""
    monkeypatch.setattr(gathered, "GATHER_COST_ROWS", gather_cost_rows)
    seen = record_tile_lists(monkeypatch)
    rng = torch.Generator().manual_seed(11)
    layout = random_block_layout(2, 6, 45, 77, 8, 16, 0.3, seed=5)
    counts = layout.kv_num_blocks.clone()
    counts[:, 1, 2] = 0  # a head without blocks where the rest of its group has some
    counts[1, 3:, :2] = 0  # a whole group without blocks
    layout = BlockSparseLayout.from_kv_blocks(
        counts, layout.kv_indices, q_block_size=8, kv_block_size=16, seq_len_q=45, seq_len_kv=77
    )
    q, k, v = make_qkv(rng, 2, 6, 2, 45, 77, 16, torch.float32)

    def oracle(q_, k_, v_, compute):
        return block_sparse_attention_reference(q_, k_, v_, layout, compute_dtype=compute)

    check_rule(engine_path(layout, True, differentiate_lse), oracle, q, k, v, differentiate_lse=differentiate_lse)
    assert seen and {lists.shape[1] for lists, _ in seen} == {2 if union else 6}


def test_lists_repeated_per_query_head_run_as_one_list_per_kv_head(monkeypatch):
    """A layout per query head whose GQA groups list the same blocks runs exactly like the layout
    per KV head it repeats: one gather and one mask per group."""
    seen = record_tile_lists(monkeypatch)
    per_kv = random_block_layout(1, 2, 70, 70, 16, 16, 0.4, seed=9)
    per_q = BlockSparseLayout.from_kv_blocks(
        per_kv.kv_num_blocks.repeat_interleave(3, dim=1),
        per_kv.kv_indices.repeat_interleave(3, dim=1),
        q_block_size=16, kv_block_size=16, seq_len_q=70, seq_len_kv=70,
    )  # fmt: skip
    q, k, v = make_qkv(torch.Generator().manual_seed(4), 1, 6, 2, 70, 70, 16, torch.float32)
    with torch.no_grad():
        expected = block_sparse_attn(q, k, v, per_kv, backend="torch")
        got = block_sparse_attn(q, k, v, per_q, backend="torch")
    assert torch.equal(got, expected)
    assert seen[-1][1] is None  # no per-head membership term


@pytest.mark.parametrize("differentiate_lse", [False, True], ids=["output", "lse_grad"])
@pytest.mark.parametrize(
    "hq, hkv, seq_q, seq_kv, block, topk, causal, dtype",
    [
        (4, 2, 70, 70, 16, 3, True, torch.float32),
        (4, 1, 37, 100, 16, 2, True, torch.float32),
        (2, 2, 64, 64, 8, 3, False, torch.float32),
        (8, 2, 150, 150, 16, 4, True, torch.float16),  # more rows per block than one tile holds
        (4, 2, 96, 96, 16, 3, True, torch.bfloat16),
    ],
)
def test_moba_matches_oracle(hq, hkv, seq_q, seq_kv, block, topk, causal, dtype, differentiate_lse):
    rng = torch.Generator().manual_seed(seq_q * 31 + topk)
    q, k, v = make_qkv(rng, 2, hq, hkv, seq_q, seq_kv, 32, dtype)
    routes = moba_route(q.detach(), k.detach(), block_size=block, topk=topk, causal=causal)

    def attention(q_, k_, v_):
        return moba_attn(q_, k_, v_, block_size=block, topk=topk, causal=causal, return_lse=True, backend="torch")

    def oracle(q_, k_, v_, compute):
        return moba_attention_reference(q_, k_, v_, routes, block_size=block, causal=causal, compute_dtype=compute)

    check_rule(attention, oracle, q, k, v, differentiate_lse=differentiate_lse)


def assert_same(got, ref):
    for a, b in zip(got, ref):
        assert torch.equal(torch.isneginf(a), torch.isneginf(b))
        assert max_err(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0)) < 1e-12


def test_varlen_paths_agree_with_reference_backend():
    rng = torch.Generator().manual_seed(5)
    lengths = [30, 0, 45, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, max_len = sum(lengths), max(lengths)
    q, k, v = (torch.randn(total, h, 16, generator=rng, dtype=torch.float64) for h in (4, 2, 2))
    layout = random_block_layout(len(lengths), 2, max_len, max_len, 8, 8, 0.5, seed=1)
    got = block_sparse_attn_varlen(q, k, v, cu, cu, max_len, max_len, layout, return_lse=True, backend="torch")
    ref = block_sparse_attn_varlen(q, k, v, cu, cu, max_len, max_len, layout, return_lse=True, backend="reference")
    assert_same(got, ref)
    got = moba_attn_varlen(q, k, v, cu, max_len, 8, 2, return_lse=True, backend="torch")
    ref = moba_attn_varlen(q, k, v, cu, max_len, 8, 2, return_lse=True, backend="reference")
    assert_same(got, ref)


def test_chunks_stay_within_the_budget(monkeypatch):
    """Small chunks give the one-chunk result, and no chunk's scores exceed the budget: no S x S buffer."""
    rng = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(rng, 1, 4, 2, 512, 512, 16, torch.float64)
    layout = random_block_layout(1, 2, 512, 512, 32, 32, 0.3, seed=2)
    whole = block_sparse_attn(q, k, v, layout, backend="torch")
    (whole_grad,) = torch.autograd.grad(whole.sum(), q)

    budget = 64 * 32 * 16  # 16 listed 32-key blocks of 64-row tiles (a GQA pair of 32-row tiles)
    largest = []
    flash = gathered.FLASH_CPU

    def spy(q4, k4, v4, *, attn_mask, scale):
        largest.append(attn_mask.numel())
        return flash(q4, k4, v4, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(gathered, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(gathered, "FLASH_CPU", spy)
    chunked = block_sparse_attn(q, k, v, layout, backend="torch")
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), q)
    assert len(largest) > 4 and max(largest) <= budget < 512 * 512 * 4
    assert max_err(chunked, whole) < 1e-12 and max_err(chunked_grad, whole_grad) < 1e-12


def test_chunks_are_recomputed_in_backward_above_the_saved_budget(monkeypatch):
    """Under autograd the chunks are kept while they fit SAVED_ELEMENTS and checkpointed beyond it:
    the same numbers either way."""
    rng = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(rng, 1, 4, 2, 200, 200, 16, torch.float64)
    layout = random_block_layout(1, 2, 200, 200, 16, 16, 0.4, seed=1)
    calls = []
    real = gathered.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gathered, "checkpoint", spy)
    results = []
    for budget in (1 << 40, 0):
        monkeypatch.setattr(gathered, "SAVED_ELEMENTS", budget)
        out = block_sparse_attn(q, k, v, layout, backend="torch")
        results.append((out, *torch.autograd.grad((out * out).sum(), (q, k, v))))
        assert bool(calls) == (budget == 0)
    for kept, recomputed in zip(*results):
        assert max_err(kept, recomputed) < 1e-12


def test_auto_backend_on_the_cpu_is_the_gathered_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 1, 4, 8)
    assert engine._resolve_backend("auto", q, {"block_size": 16}) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        engine._resolve_backend("dense", q, {"block_size": 16})


def test_runs_eagerly_under_torch_compile():
    """torch.compile breaks the graph around the path (Inductor's CPU `arange` arithmetic is unsafe)."""
    rng = torch.Generator().manual_seed(11)
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 4, 2, 40, 40, 16, torch.float32))
    layout = random_block_layout(1, 2, 40, 40, 8, 8, 0.5, seed=4)

    def attention(q_, k_, v_):
        return block_sparse_attn(q_, k_, v_, layout, backend="torch") * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(attention)(q, k, v), attention(q, k, v))


def test_routed_chunks_and_tiles_do_not_change_the_result(monkeypatch):
    """MoBA's path in many small chunks and tiles gives the one-chunk result, and its products stay small."""
    rng = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(rng, 2, 4, 2, 300, 300, 16, torch.float64)

    def run():
        out, lse = moba_attn(q, k, v, block_size=16, topk=3, return_lse=True, backend="torch")
        return (out, lse, *torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v)))

    whole = run()
    largest = []
    bmm = torch.bmm

    def spy(a, b):
        largest.append(a.shape[0] * a.shape[1] * b.shape[2])
        return bmm(a, b)

    monkeypatch.setattr(routed_torch, "CHUNK_ELEMENTS", 16 * 3 * 40)  # 40 rows a chunk
    monkeypatch.setattr(routed_torch, "TILE_ROWS", 8)
    monkeypatch.setattr(routed_torch.torch, "bmm", spy)
    chunked = run()
    monkeypatch.undo()
    assert len(largest) > 30 and max(largest) < 300 * 300
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), chunked, whole):
        assert max_err(a, b) < 1e-12, name
