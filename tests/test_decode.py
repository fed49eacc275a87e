"""Block-sparse decode against the fp64 oracle.

The CPU tests run the C++ twin of the CUDA op, which partitions each row's block list into the same
splits and merges them with the same LSE combine, so the split/combine logic (empty splits, rows
without a visible key) is exercised without a GPU. The `gpu` tests run the CUDA kernels.
"""

import math

import pytest
import torch

from sparse_attn import BlockSparseLayout
from sparse_attn import decode as decode_module
from sparse_attn.decode import block_sparse_decode, decode_available
from sparse_attn.reference import block_sparse_attention_reference
from sparse_attn.testing import assert_flash_rule, max_err, random_block_layout

pytestmark = pytest.mark.skipif(not decode_available("cpu"), reason="the native extension is not built")

Q_BLOCK = 16  # >= every Sq below: decode layouts have a single query block


def make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype, device="cpu"):
    shapes = ((batch, hq, seq_q, dim), (batch, hkv, seq_kv, dim), (batch, hkv, seq_kv, dim))
    return [torch.randn(s, generator=rng, dtype=torch.float64).to(device, dtype) for s in shapes]


def make_layout(rng, batch, heads, seq_q, seq_kv, kv_block, density, *, causal=True, device="cpu"):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    return random_block_layout(
        batch, heads, seq_q, seq_kv, Q_BLOCK, kv_block, density, causal=causal, seed=seed, device=device
    )


def check_decode(q, k, v, layout, *, causal=True, scale=None, num_splits=0):
    """Runs the op and compares with the oracle; returns (out, lse, reference lse)."""
    out, lse = block_sparse_decode(
        q, k, v, layout, causal=causal, softmax_scale=scale, num_splits=num_splits, return_lse=True
    )
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, layout, causal=causal, softmax_scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows without a visible key must have LSE -inf"
    assert bool((out[empty] == 0).all()), "rows without a visible key must be 0"
    # The LSE is fp32: compare relative to its magnitude.
    lse_tol = 1e-3 if q.dtype in (torch.float16, torch.bfloat16) else 2e-6
    lse_err = ((lse.double() - ref_lse).abs() / (1 + ref_lse.abs()))[~empty]
    assert lse_err.numel() == 0 or lse_err.max().item() <= lse_tol, f"LSE error {lse_err.max().item():.3e}"
    if q.dtype in (torch.float32, torch.float64):
        tol = 1e-10 if q.dtype == torch.float64 else 1e-5
        assert max_err(out, ref_out) <= tol, f"output error {max_err(out, ref_out):.3e}"
    else:
        same_out, _ = block_sparse_attention_reference(
            q, k, v, layout, causal=causal, softmax_scale=scale, compute_dtype=q.dtype
        )
        assert_flash_rule(out, ref_out, same_out, 2, "output")
    return out, lse, ref_lse


# ------------------------------------------------------------------------------------------------ CPU twin
GQA = {"mha": (4, 4), "gqa4": (8, 2), "gqa8": (8, 1)}


@pytest.mark.parametrize("num_splits", [1, 3, 64, 10**9])
@pytest.mark.parametrize("layout_heads", ["q", "kv", "one"])
@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("seq_q", [1, 4, 16])
def test_cpu_matches_reference_fp32(rng, seq_q, gqa, layout_heads, num_splits):
    hq, hkv = GQA[gqa]
    heads = {"q": hq, "kv": hkv, "one": 1}[layout_heads]
    seq_kv = 333  # ragged: not a multiple of the block
    layout = make_layout(rng, 2, heads, seq_q, seq_kv, 32, 0.4)
    q, k, v = make_qkv(rng, 2, hq, hkv, seq_q, seq_kv, 16, torch.float32)
    check_decode(q, k, v, layout, num_splits=num_splits)


def _nan_key_case(device, head_dim=16):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, head_dim, generator=generator)
    k, v = (torch.randn(1, 1, 300, head_dim, generator=generator) for _ in range(2))
    k[0, 0, 5] = float("nan")  # one key of the first block, which lands in the first split
    layout = random_block_layout(1, 1, 1, 300, Q_BLOCK, 16, 1.0, causal=True, seed=1, device=device)
    return q.to(device), k.to(device), v.to(device), layout


@pytest.mark.parametrize("num_splits", [1, 4])
def test_cpu_nan_scores_propagate(num_splits):
    """A NaN score makes its row NaN in every split layout (not a finite answer from the other splits)."""
    out, lse = block_sparse_decode(*_nan_key_case("cpu"), num_splits=num_splits, return_lse=True)
    assert out.isnan().all() and lse.isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_nan_scores_propagate(num_splits):
    q, k, v, layout = _nan_key_case("cuda", head_dim=64)  # the smallest head dim the CUDA kernel takes
    out, lse = block_sparse_decode(q.half(), k.half(), v.half(), layout, num_splits=num_splits, return_lse=True)
    assert out.isnan().all() and lse.isnan().all()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_cpu_fp32_long_rows_follow_flash_rule(rng, num_splits):
    """Thousands of keys per row, one key per block: the sums run long, and the twin must stay within
    2x of a fp32 PyTorch implementation (float running sums missed it by up to 11x)."""
    seq_kv = 4096
    layout = make_layout(rng, 1, 1, 4, seq_kv, 1, 1.0)
    q, k, v = make_qkv(rng, 1, 2, 1, 4, seq_kv, 16, torch.float32)
    q = q * 3  # logits with a standard deviation of 3
    out = block_sparse_decode(q, k, v, layout, num_splits=num_splits)
    refs = [
        block_sparse_attention_reference(q, k, v, layout, compute_dtype=dtype)[0] for dtype in (torch.float64, q.dtype)
    ]
    assert_flash_rule(out, *refs, 2, "output")


@pytest.mark.parametrize("num_splits", [0, 1, 3, 1000])
@pytest.mark.parametrize("seq_q", [1, 5, 16])
def test_cpu_matches_reference_fp64(rng, seq_q, num_splits):
    layout = make_layout(rng, 2, 2, seq_q, 517, 64, 0.5)
    q, k, v = make_qkv(rng, 2, 8, 2, seq_q, 517, 24, torch.float64)
    check_decode(q, k, v, layout, num_splits=num_splits)


def test_cpu_fp64_with_a_sink_stays_fp64(rng):
    """The CPU op's LSE is fp64 for fp64 q, so the sink applied after it keeps fp64 accuracy."""
    layout = make_layout(rng, 2, 2, 3, 517, 64, 0.5)
    q, k, v = make_qkv(rng, 2, 8, 2, 3, 517, 24, torch.float64)
    sink = torch.rand(8, generator=rng, dtype=torch.float64) * 4 - 1
    out = block_sparse_decode(q, k, v, layout, attn_sink=sink)
    ref, _ = block_sparse_attention_reference(q, k, v, layout, attn_sink=sink)
    assert max_err(out, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq_q", [1, 4, 16])
def test_cpu_half_precision_flash_rule(rng, seq_q, dtype):
    layout = make_layout(rng, 2, 8, seq_q, 700, 64, 0.3)
    q, k, v = make_qkv(rng, 2, 8, 2, seq_q, 700, 32, dtype)
    check_decode(q, k, v, layout, num_splits=3)


def test_cpu_batch_broadcast_layout(rng):
    layout = make_layout(rng, 1, 2, 3, 300, 32, 0.5)
    q, k, v = make_qkv(rng, 3, 4, 2, 3, 300, 16, torch.float64)
    check_decode(q, k, v, layout, num_splits=2)


def test_cpu_zero_density_gives_zero_and_neg_inf(rng):
    layout = make_layout(rng, 2, 4, 4, 256, 32, 0.0)
    q, k, v = make_qkv(rng, 2, 4, 2, 4, 256, 16, torch.float32)
    out, lse, _ = check_decode(q, k, v, layout, num_splits=3)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_cpu_rows_emptied_by_causality(rng):
    # Only the last (ragged) block is selected: query i sits at key 84 + i, the block covers keys
    # 96..99, so rows 0..11 see nothing, rows 12..15 see 1..4 keys.
    seq_q, seq_kv, kv_block = 16, 100, 8
    mask = torch.zeros(1, 1, 1, 13, dtype=torch.bool)
    mask[..., 12] = True
    layout = BlockSparseLayout.from_dense_mask(
        mask, q_block_size=Q_BLOCK, kv_block_size=kv_block, seq_len_q=seq_q, seq_len_kv=seq_kv
    )
    q, k, v = make_qkv(rng, 1, 2, 1, seq_q, seq_kv, 16, torch.float64)
    for splits in (1, 4):
        _, lse, _ = check_decode(q, k, v, layout, num_splits=splits)
        assert bool(torch.isneginf(lse[..., :12]).all()) and bool(torch.isfinite(lse[..., 12:]).all())


def test_cpu_queries_before_the_cache_start(rng):
    # Sq > Skv: the first rows sit at negative key positions and see nothing.
    layout = make_layout(rng, 1, 2, 12, 7, 4, 1.0)
    q, k, v = make_qkv(rng, 1, 2, 2, 12, 7, 16, torch.float64)
    _, lse, _ = check_decode(q, k, v, layout, num_splits=2)
    assert bool(torch.isneginf(lse[..., :5]).all())


def test_cpu_non_causal_custom_scale(rng):
    layout = make_layout(rng, 2, 2, 4, 400, 32, 0.5, causal=False)
    q, k, v = make_qkv(rng, 2, 4, 2, 4, 400, 16, torch.float64)
    check_decode(q, k, v, layout, causal=False, scale=0.37, num_splits=3)


def test_cpu_block_larger_than_cache(rng):
    layout = make_layout(rng, 1, 1, 2, 300, 512, 1.0)
    q, k, v = make_qkv(rng, 1, 4, 1, 2, 300, 16, torch.float64)
    check_decode(q, k, v, layout, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cpu_strided_inputs(rng, dtype):
    # A slice of a larger cache: strided along the sequence and head dims, contiguous in the last. The CPU op
    # reads it in place, in its dtype: the same result, bit for bit, as from contiguous copies.
    layout = make_layout(rng, 1, 2, 2, 200, 32, 0.5)
    q, k_big, v_big = make_qkv(rng, 1, 4, 4, 2, 260, 16, dtype)
    k, v = k_big[:, ::2, :200], v_big[:, 1::2, 30:230]
    if dtype == torch.float64:
        check_decode(q, k, v, layout, num_splits=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Sq, H, D) memory, as transformers' queries
    strided = block_sparse_decode(q, k, v, layout, num_splits=3, return_lse=True)
    copied = block_sparse_decode(q.contiguous(), k.contiguous(), v.contiguous(), layout, num_splits=3, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(strided, copied))


def test_splits_agree(rng):
    layout = make_layout(rng, 2, 2, 1, 1000, 16, 0.3)
    q, k, v = make_qkv(rng, 2, 8, 2, 1, 1000, 32, torch.float64)
    results = [block_sparse_decode(q, k, v, layout, num_splits=s, return_lse=True) for s in (1, 2, 7, 0, 5000)]
    for out, lse in results[1:]:
        assert max_err(out, results[0][0]) < 1e-12 and max_err(lse, results[0][1]) < 1e-5


def test_opcheck_cpu(rng):
    layout = make_layout(rng, 2, 2, 3, 150, 32, 0.5)
    q, k, v = make_qkv(rng, 2, 4, 2, 3, 150, 16, torch.float32)
    args = (q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.kv_block_size, True, 0.25, 3)
    torch.library.opcheck(torch.ops.sparse_attn.block_sparse_decode.default, args)
    # Called directly with inputs that need gradients, the op refuses backward rather than skipping them.
    out, _ = torch.ops.sparse_attn.block_sparse_decode(q.requires_grad_(), *args[1:])
    with pytest.raises(NotImplementedError, match="inference only"):
        out.sum().backward()


# ------------------------------------------------------------------------------------------------ errors
def _small_inputs(rng, seq_q=2, dtype=torch.float32):
    layout = make_layout(rng, 1, 2, seq_q, 64, 16, 0.5)
    return (*make_qkv(rng, 1, 4, 2, seq_q, 64, 16, dtype), layout)


def test_rejects_too_many_queries(rng):
    layout = random_block_layout(1, 2, 17, 64, 32, 16, 0.5)
    q, k, v = make_qkv(rng, 1, 4, 2, 17, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="at most 16"):
        block_sparse_decode(q, k, v, layout)


def test_rejects_several_query_blocks(rng):
    layout = random_block_layout(1, 2, 8, 64, 4, 16, 0.5)
    q, k, v = make_qkv(rng, 1, 4, 2, 8, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="single query block"):
        block_sparse_decode(q, k, v, layout)


def test_rejects_requires_grad(rng):
    q, k, v, layout = _small_inputs(rng)
    with pytest.raises(ValueError, match="block_sparse_attn"):
        block_sparse_decode(q.requires_grad_(), k, v, layout)
    with torch.no_grad():  # no graph is recorded: allowed
        block_sparse_decode(q, k, v, layout)


def test_rejects_bad_arguments(rng):
    q, k, v, layout = _small_inputs(rng)
    with pytest.raises(TypeError, match="layout"):
        block_sparse_decode(q, k, v, layout.kv_indices)
    with pytest.raises(TypeError, match="num_splits"):
        block_sparse_decode(q, k, v, layout, num_splits=True)
    with pytest.raises(ValueError, match="num_splits"):
        block_sparse_decode(q, k, v, layout, num_splits=-1)
    with pytest.raises(TypeError, match="causal"):
        block_sparse_decode(q, k, v, layout, causal=1)
    with pytest.raises(ValueError, match="softmax_scale"):
        block_sparse_decode(q, k, v, layout, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_decode(q, k.double(), v, layout)
    with pytest.raises(TypeError, match="floating-point"):
        block_sparse_decode(q.long(), k.long(), v.long(), layout)
    with pytest.raises(ValueError, match="layout has"):
        block_sparse_decode(q, k, v, make_layout(rng, 1, 3, 2, 64, 16, 0.5))
    with pytest.raises(ValueError, match="seq_len_kv"):
        block_sparse_decode(q, k[:, :, :32], v[:, :, :32], layout)
    with pytest.raises(ValueError, match="contiguous in the last dim"):
        k_strided = torch.randn(1, 2, 64, 32, dtype=torch.float32)[..., ::2]
        block_sparse_decode(q, k_strided, k_strided, layout)


def test_native_op_checks(rng):
    q, k, v, layout = _small_inputs(rng)
    op = torch.ops.sparse_attn.block_sparse_decode
    counts, indices = layout.kv_num_blocks, layout.kv_indices
    with pytest.raises(ValueError, match="single query block"):
        op(q, k, v, counts.expand(1, 2, 2).contiguous(), indices.expand(1, 2, 2, -1).contiguous(), 16, True, 0.25, 0)
    with pytest.raises(TypeError, match="int32"):
        op(q, k, v, counts.long(), indices, 16, True, 0.25, 0)
    with pytest.raises(ValueError, match="kv_block_size"):
        op(q, k, v, counts, indices, 0, True, 0.25, 0)
    bad = indices.clone()
    bad[..., 0] = 99
    with pytest.raises(ValueError, match="outside"):
        op(q, k, v, counts, bad, 16, True, 0.25, 1)


def test_missing_native_kernel_raises(rng, monkeypatch):
    q, k, v, layout = _small_inputs(rng)
    monkeypatch.setattr(decode_module, "_has_kernel", lambda op, key: False)
    with pytest.raises(NotImplementedError, match="no native kernel"):
        block_sparse_decode(q, k, v, layout)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 1, 5, 37])
@pytest.mark.parametrize("seq_q", [1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_matches_reference(rng, dim, dtype, seq_q, num_splits):
    assert decode_available("cuda"), "the CUDA decode kernel is not built"
    layout = make_layout(rng, 2, 8, seq_q, 5000, 128, 0.2, device="cuda")
    q, k, v = make_qkv(rng, 2, 32, 8, seq_q, 5000, dim, dtype, device="cuda")
    out, lse, _ = check_decode(q, k, v, layout, num_splits=num_splits)
    # Same partitioning as the CPU twin: the two agree to an output rounding step or two.
    cpu_out, cpu_lse = block_sparse_decode(
        q.cpu(), k.cpu(), v.cpu(), layout.to("cpu"), num_splits=num_splits, return_lse=True
    )
    assert max_err(out.cpu(), cpu_out) <= 2 * max_err(cpu_out + 0.3 - 0.3, cpu_out) + 1e-3
    assert max_err(lse.cpu(), cpu_lse) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        "q_heads_layout",
        "shared_layout",
        "batch_broadcast",
        "zero_density",
        "non_causal",
        "head_dim_96",
        "head_dim_256",
        "sq16_gqa8",
        "small_blocks",
        "unaligned",
        "strided",
    ],
)
def test_cuda_cases(rng, case):
    batch, hq, hkv, seq_q, seq_kv, dim, kv_block, density = 2, 16, 4, 4, 3001, 128, 64, 0.3
    heads, layout_batch, causal = hkv, batch, True
    if case == "q_heads_layout":
        heads = hq
    elif case == "shared_layout":
        heads = 1
    elif case == "batch_broadcast":
        layout_batch = 1
    elif case == "zero_density":
        density = 0.0
    elif case == "non_causal":
        causal = False
    elif case == "head_dim_96":
        dim = 96
    elif case == "head_dim_256":
        dim = 256
    elif case == "sq16_gqa8":
        hq, hkv, heads, seq_q = 16, 2, 2, 16
    elif case == "small_blocks":
        kv_block = 8
    layout = make_layout(rng, layout_batch, heads, seq_q, seq_kv, kv_block, density, causal=causal, device="cuda")
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, torch.bfloat16, device="cuda")
    if case == "unaligned":  # k and v start 2 bytes past a 16-byte boundary: the scalar-load path
        k, v = (torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in (k, v))
    elif case == "strided":  # a window of a larger cache
        k_big, v_big = make_qkv(rng, batch, hkv, hkv, 1, seq_kv + 40, dim, torch.bfloat16, device="cuda")[1:]
        k, v = k_big[:, :, 24 : 24 + seq_kv], v_big[:, :, 8 : 8 + seq_kv]
    out, lse, _ = check_decode(q, k, v, layout, causal=causal, num_splits=3)
    if case == "zero_density":
        assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


@pytest.mark.gpu
def test_opcheck_cuda(rng):
    layout = make_layout(rng, 2, 8, 1, 1000, 128, 0.3, device="cuda")
    q, k, v = make_qkv(rng, 2, 32, 8, 1, 1000, 128, torch.bfloat16, device="cuda")
    args = (q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.kv_block_size, True, 1 / math.sqrt(128), 0)
    torch.library.opcheck(torch.ops.sparse_attn.block_sparse_decode.default, args)
