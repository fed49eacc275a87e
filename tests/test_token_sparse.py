"""Token-sparse attention and sparse MLA: spec shared/specs/hisa_dsa.md section 5, oracle 7.

Each backend (the Triton kernels, under the interpreter on the CPU; the PyTorch path) is held to
FlashAttention's rule against the float64 dense-mask reference: ragged index lists with -1 and
out-of-range entries, GQA with per-head and shared lists, empty rows, a head dim that splits into a
main part and a rest, a value dim of its own, the attention sink, and the LSE's gradient.
"""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from sparse_attn.engine import triton_available
from sparse_attn.methods.hisa import hisa_select
from sparse_attn.reference import token_sparse_attention_reference
from sparse_attn.testing import assert_flash_rule, assert_flash_rule_with_grads, max_err
from sparse_attn.token_sparse import sparse_mla, token_sparse_attn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    if request.param == "triton" and not triton_available(DEVICE):
        pytest.skip("triton is not installed")
    return request.param


def random_indices(rng, batch, seq_q, groups, count, seq_kv, invalid=0.2):
    """Distinct positions per row, with about `invalid` of the entries -1 or past the keys."""
    rows = [torch.randperm(seq_kv, generator=rng)[:count] for _ in range(batch * seq_q * groups)]
    indices = torch.stack(rows).view(batch, seq_q, groups, count)
    drop = torch.rand(indices.shape, generator=rng) < invalid
    junk = torch.where(torch.rand(indices.shape, generator=rng) < 0.5, -1, seq_kv + 3)
    return torch.where(drop, junk, indices).to(DEVICE)


def make_inputs(rng, batch, hq, hkv, seq_q, seq_kv, dim, value_dim, dtype):
    q = torch.randn(batch, hq, seq_q, dim, generator=rng).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(batch, hkv, seq_kv, dim, generator=rng).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(batch, hkv, seq_kv, value_dim, generator=rng).to(DEVICE, dtype).requires_grad_()
    return q, k, v


def references(q, k, v, indices, dtype, scale=None):
    ref = token_sparse_attention_reference(q, k, v, indices, causal=False, softmax_scale=scale)
    same = token_sparse_attention_reference(q, k, v, indices, causal=False, softmax_scale=scale, compute_dtype=dtype)
    return ref, same


CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, value_dim, count, shared lists)
    "gqa_per_head_lists": (2, 4, 2, 9, 70, 32, 32, 24, False),
    "gqa_shared_list": (1, 8, 2, 6, 50, 32, 32, 40, True),
    "mqa_odd_dims_split": (1, 4, 1, 5, 45, 80, 48, 20, True),  # 80 = 64 + 16, value dim 48
    "more_indices_than_a_tile": (1, 2, 1, 3, 200, 16, 16, 150, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_with_gradients(rng, backend, case, dtype, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")
    batch, hq, hkv, seq_q, seq_kv, dim, value_dim, count, shared = CASES[case]
    q, k, v = make_inputs(rng, batch, hq, hkv, seq_q, seq_kv, dim, value_dim, dtype)
    indices = random_indices(rng, batch, seq_q, 1 if shared else hkv, count, seq_kv)
    indices[0, 0] = -1  # an empty row
    out, lse = token_sparse_attn(q, k, v, indices, return_lse=True, backend=backend)
    (ref, ref_lse), (same, _) = references(q, k, v, indices, dtype)
    assert out.shape == (batch, hq, seq_q, value_dim) and out.dtype == dtype
    assert bool((out[0, :, 0] == 0).all()) and bool((lse[0, :, 0] == float("-inf")).all())
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(
        lse[finite].double(), ref_lse[finite], rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-5
    )
    assert_flash_rule_with_grads(out, ref, same, (q, k, v), rng)


def test_key_gradients_sum_many_rows_in_the_working_precision(rng, backend):
    """Every one of 256 fp16 rows over the same 2 keys: dK and dV sum 256 terms each. Summed in fp32 and
    rounded once they are within two fp16 roundings of the fp64 gradient (the PyTorch path once summed
    its gathered rows' scatter in fp16: several times that)."""
    q, k, v = make_inputs(rng, 1, 1, 1, 256, 2, 16, 16, torch.float16)
    indices = torch.arange(2, device=DEVICE).expand(1, 256, 1, 2).int()
    grad = torch.randn(1, 1, 256, 16, generator=rng).to(DEVICE)
    got = torch.autograd.grad((token_sparse_attn(q, k, v, indices, backend=backend) * grad.half()).sum(), (k, v))
    ref = token_sparse_attention_reference(q, k, v, indices, causal=False)[0]
    for name, g, r in zip("kv", got, torch.autograd.grad((ref * grad.double()).sum(), (k, v))):
        assert max_err(g, r) <= 2 * 2**-11 * float(r.abs().max()), f"d{name}"


def test_lse_gradient_and_sink(rng, backend):
    q, k, v = make_inputs(rng, 1, 4, 2, 7, 60, 32, 32, torch.float32)
    sink = (torch.randn(4, generator=rng)).to(DEVICE).requires_grad_()
    indices = random_indices(rng, 1, 7, 2, 16, 60)
    indices[0, 3] = -1
    out, lse = token_sparse_attn(q, k, v, indices, attn_sink=sink, return_lse=True, backend=backend)
    ref, ref_lse = token_sparse_attention_reference(q, k, v, indices, causal=False)
    ref = ref * torch.sigmoid(ref_lse - sink.double()[:, None])[..., None]
    assert_flash_rule(out, ref, ref.float(), 2, "output with sink")
    assert bool((out[0, :, 3] == 0).all())
    weights = torch.randn(lse.shape, generator=rng).to(DEVICE)
    finite = torch.isfinite(ref_lse)
    got_loss = (out * 0.5).sum() + (lse.masked_fill(~finite, 0) * weights).sum()
    ref_loss = (ref * 0.5).sum() + (ref_lse.masked_fill(~finite, 0) * weights.double()).sum()
    for got, want in zip(
        torch.autograd.grad(got_loss, (q, k, v, sink)), torch.autograd.grad(ref_loss, (q, k, v, sink))
    ):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_torch_path(rng):
    q, k, v = (t.detach().double().requires_grad_() for t in make_inputs(rng, 1, 2, 1, 3, 12, 8, 6, torch.float64))
    indices = random_indices(rng, 1, 3, 1, 5, 12)
    torch.autograd.gradcheck(lambda q, k, v: token_sparse_attn(q, k, v, indices, backend="torch"), (q, k, v))


@pytest.mark.parametrize("dim, value_dim", [(8, 16), (24, 32), (64, 32)])
def test_keys_and_values_over_one_storage(rng, backend, dim, value_dim):
    """k and v as views of one buffer (MLA's latent: v its leading dims) equal separate copies, whether v is
    narrower or wider than k (a v wider than k is not k's leading dims, however the kernel pads k)."""
    buffer = torch.randn(1, 2, 40, max(dim, value_dim), generator=rng).to(DEVICE)
    q = torch.randn(1, 4, 6, dim, generator=rng).to(DEVICE)
    indices = random_indices(rng, 1, 6, 1, 10, 40)
    results = []
    for shared in (True, False):
        b, query = buffer.clone().requires_grad_(), q.clone().requires_grad_()
        k, v = b[..., :dim], b[..., :value_dim]
        if not shared:
            k, v = k.clone(), v.clone()
        out = token_sparse_attn(query, k, v, indices, backend=backend)
        out.square().sum().backward()
        results.append((out.detach(), query.grad, b.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sparse_mla_flashmla_conventions(rng, backend):
    """FlashMLA's layout: q (s_q, h_q, 576), kv (s_kv, 1, 576) with V its first 512 dims, one index list
    per query; the model's sm_scale; lse (s_q, h_q) in natural log."""
    seq_q, seq_kv, heads = 4, 40, 16
    q = torch.randn(seq_q, heads, 576, generator=rng).to(DEVICE, torch.float16).requires_grad_()
    kv = torch.randn(seq_kv, 1, 576, generator=rng).to(DEVICE, torch.float16).requires_grad_()
    indices = random_indices(rng, 1, seq_q, 1, 12, seq_kv)[0]
    scale = 192**-0.5
    out, lse = sparse_mla(q, kv, indices, scale, d_v=512, backend=backend)
    assert out.shape == (seq_q, heads, 512) and lse.shape == (seq_q, heads)
    q4, k4 = q.transpose(0, 1)[None], kv.transpose(0, 1)[None]
    ref, ref_lse = token_sparse_attention_reference(
        q4, k4, k4[..., :512], indices[None], causal=False, softmax_scale=scale
    )
    same, _ = token_sparse_attention_reference(
        q4, k4, k4[..., :512], indices[None], causal=False, softmax_scale=scale, compute_dtype=torch.float16
    )
    assert_flash_rule_with_grads(out, ref[0].transpose(0, 1), same[0].transpose(0, 1), (q, kv), rng)
    torch.testing.assert_close(lse.double(), ref_lse[0].transpose(0, 1), rtol=0, atol=1e-3)


def test_selection_from_hisa_drives_attention(rng, backend):
    """The [B, Sq, 1, K] selections of the indexer feed the attention directly (causal by construction)."""
    batch, seq, heads, dim = 1, 48, 4, 16
    q_index = torch.randn(batch, seq, heads, dim, generator=rng).to(DEVICE)
    k_index = torch.randn(batch, seq, dim, generator=rng).to(DEVICE)
    weights = torch.rand(batch, seq, heads, generator=rng).to(DEVICE)
    indices = hisa_select(q_index, k_index, weights, topk=16, block_size=16, block_topk=2)
    q, k, v = make_inputs(rng, batch, 4, 2, seq, seq, 32, 32, torch.float32)
    out = token_sparse_attn(q, k, v, indices, backend=backend)
    ref, _ = token_sparse_attention_reference(q, k, v, indices, causal=True)
    assert_flash_rule(out, ref, ref.float(), 2, "output")


def test_bad_inputs_raise_clear_errors(rng):
    q, k, v = make_inputs(rng, 1, 4, 2, 5, 20, 16, 16, torch.float32)
    indices = random_indices(rng, 1, 5, 2, 4, 20)
    with pytest.raises(ValueError, match="indices dim 2"):
        token_sparse_attn(q, k, v, torch.cat([indices, indices[:, :, :1]], dim=2))
    with pytest.raises(ValueError, match="indices must start"):
        token_sparse_attn(q, k, v, indices[:, :3])
    with pytest.raises(TypeError, match="indices"):
        token_sparse_attn(q, k, v, indices.float())
    with pytest.raises(ValueError, match="v must be"):
        token_sparse_attn(q, k, v[:, :, :10], indices)
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        token_sparse_attn(q[:, :3], k, v, indices)
    with pytest.raises(ValueError, match="attn_sink"):
        token_sparse_attn(q, k, v, indices, attn_sink=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="duplicates"):
        token_sparse_attn(q, k, v, torch.zeros_like(indices), check_indices=True)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla(q[0].transpose(0, 1), k[0, :1].transpose(0, 1), indices[0, :, :1], 0.1, d_v=32)
    with pytest.raises(TypeError, match="sm_scale is required"):
        sparse_mla(q[0].transpose(0, 1), k[0, :1].transpose(0, 1), indices[0, :, :1], None, d_v=8)
    mla_q, latent, mla_indices = q[0].transpose(0, 1), k[0, :1].transpose(0, 1), indices[0, :, :1]
    with pytest.raises(ValueError, match="sm_scale must be"):
        sparse_mla(mla_q, latent, mla_indices, 0.0, d_v=8)
    with pytest.raises(ValueError, match="q and kv must share d_qk"):
        sparse_mla(mla_q[..., :8], latent, mla_indices, 0.1, d_v=8)
    with pytest.raises(ValueError, match="duplicates"):
        sparse_mla(mla_q, latent, torch.zeros_like(mla_indices), 0.1, d_v=8, check_indices=True)
    with pytest.raises(ValueError, match="backend"):
        token_sparse_attn(q, k, v, indices, backend="fast")


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mla", [False, True])
def test_gpu_real_sizes_bf16(rng, mla):
    """bf16 at DSA's sizes: MLA's 128 heads over one 576-d latent, and GQA 32/8 at D=128; 2048 indices."""
    seq_q, seq_kv, count = 256, 8192, 2048
    if mla:
        q = torch.randn(1, 128, seq_q, 576, generator=rng).to(DEVICE, torch.bfloat16).requires_grad_()
        kv = torch.randn(1, 1, seq_kv, 576, generator=rng).to(DEVICE, torch.bfloat16).requires_grad_()
        k, v, inputs, scale = kv, kv[..., :512], (q, kv), 192**-0.5
    else:
        q, k, v = make_inputs(rng, 1, 32, 8, seq_q, seq_kv, 128, 128, torch.bfloat16)
        inputs, scale = (q, k, v), 1 / math.sqrt(128)
    indices = random_indices(rng, 1, seq_q, 1, count, seq_kv, invalid=0.05)
    out = token_sparse_attn(q, k, v, indices, softmax_scale=scale)
    ref, _ = token_sparse_attention_reference(q, k, v, indices, causal=False, softmax_scale=scale)
    same, _ = token_sparse_attention_reference(
        q, k, v, indices, causal=False, softmax_scale=scale, compute_dtype=torch.bfloat16
    )
    assert_flash_rule_with_grads(out, ref, same, inputs, rng)


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_opcheck_token_sparse_op(rng):
    from sparse_attn.kernels.token_sparse_attn import token_sparse_attn_fwd

    q, k, v = make_inputs(rng, 1, 4, 2, 5, 30, 16, 16, torch.float32)
    indices = random_indices(rng, 1, 5, 2, 8, 30).to(torch.int32)
    # The Triton interpreter executes kernels even on fake tensors: fake/compile checks run on the GPU.
    utils = ("test_schema", "test_autograd_registration")
    utils += ("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE.type == "cuda" else ()
    torch.library.opcheck(token_sparse_attn_fwd, (q, k, v, indices, 0.25), test_utils=utils)


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_value_is_key_flag_is_the_same_under_fake_tensors(rng):
    """The kernel loads v from k's tile when v is k's leading dims; torch.compile decides that on storage-less
    fake tensors (every data_ptr 0), so the decision must not read pointers and must equal the eager one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparse_attn.kernels.token_sparse_attn import _config

    q = torch.randn(1, 4, 8, 64, generator=rng)
    latent = torch.randn(1, 2, 32, 64, generator=rng)
    values = {
        "distinct": lambda t: t.clone(),
        "leading dims": lambda t: t[..., :64],
        "offset view": lambda t: t[..., 1:],
    }
    for name, value_of in values.items():
        eager = _config(q, latent, value_of(latent))["V_IS_K"]
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(latent)
            traced = _config(mode.from_tensor(q), fake, value_of(fake))["V_IS_K"]
        assert traced == eager == (name == "leading dims"), name


def test_torch_path_recomputes_chunks_above_the_saved_budget(rng, monkeypatch):
    """Under autograd the PyTorch path keeps its chunks while they fit gathered.SAVED_ELEMENTS and
    checkpoints them beyond it (its backward grew with Sq x K x D): the same numbers either way."""
    import sparse_attn.gathered as gathered
    import sparse_attn.token_sparse as token_sparse

    q, k, v = make_inputs(rng, 1, 4, 2, 50, 40, 16, 16, torch.float64)
    indices = random_indices(rng, 1, 50, 2, 12, 40)
    monkeypatch.setattr(token_sparse, "_TORCH_CHUNK_ELEMENTS", 4 * 12 * 32 * 7)  # chunks of 7 rows
    recomputed = []
    monkeypatch.setattr(gathered, "checkpoint", lambda *a, **kw: recomputed.append(1) or checkpoint(*a, **kw))
    results = []
    for budget in (1 << 40, 0):
        monkeypatch.setattr(gathered, "SAVED_ELEMENTS", budget)
        out = token_sparse_attn(q, k, v, indices, backend="torch")
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        assert len(recomputed) == (0 if budget else 8)
    for kept, again in zip(*results):
        torch.testing.assert_close(kept, again, rtol=0, atol=1e-12)


def test_no_keys_at_all(rng, backend):
    """Skv = 0: every index is out of range, so every row gives 0 and -inf, with zero gradients."""
    q, k, v = make_inputs(rng, 1, 4, 2, 6, 0, 16, 16, torch.float32)
    indices = random_indices(rng, 1, 6, 2, 4, 10)
    out, lse = token_sparse_attn(q, k, v, indices, return_lse=True, backend=backend)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    out.sum().backward()
    assert bool((q.grad == 0).all()) and k.grad.shape == k.shape


def test_no_queries_stay_in_the_graph(rng, backend):
    """Sq = 0: an empty output that backward() runs through, with zero gradients, on every path."""
    q, k, v = make_inputs(rng, 1, 4, 2, 0, 12, 16, 16, torch.float32)
    indices = torch.zeros(1, 0, 2, 4, dtype=torch.int32, device=DEVICE)
    out = token_sparse_attn(q, k, v, indices, backend=backend)
    assert out.shape == (1, 4, 0, 16)
    out.sum().backward()
    assert bool((k.grad == 0).all()) and q.grad.shape == q.shape
