"""Element offsets past 2^31 in the Triton kernels' pointer arithmetic, and grids past CUDA's axis limits.

Triton passes strides below 2^31 as int32, so `batch * stride` wraps once a tensor spans more than
2^31 elements (a large batch, a long packed sequence, HF's transposed views at long context) unless
the kernels widen their strides first, which they do when the host sets WIDE_INDEX. Here q, k and
v are views three batch rows long whose batch stride is just above 2^30 elements, so the last row
starts past 2^31. The storage is one lazy
allocation of 4.3 GB of which only the rows in use are ever written: the resident memory stays small.
The kernels read the views in place (they copy only what they cannot address), so a wrapped offset
reads the wrong memory (a crash, or a silently wrong row), which the comparison with the reference
on the same values catches.
"""

import pytest
import torch

from sparse_attn import moba_attn
from sparse_attn.engine import block_sparse_attn, triton_available
from sparse_attn.kernels.launch import MAX_GRID_YZ, batch_head_grid, wide_index
from sparse_attn.methods.hisa import dsa_indexer_logits, dsa_indexer_logits_reference
from sparse_attn.methods.moba import moba_attention_reference, moba_route
from sparse_attn.methods.xattention import xattention_estimate, xattention_estimate_reference
from sparse_attn.reference import block_sparse_attention_reference
from sparse_attn.testing import max_err, random_block_layout

BATCH, HEADS, SEQ, DIM = 3, 2, 64, 16
BATCH_STRIDE = (1 << 30) + (1 << 20)  # below 2^31 (an int32 stride), but batch 2 starts past 2^31


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def far_apart_qkv(request):
    """q, k, v (3, 2, 64, 16) float16 views into one storage, batch rows BATCH_STRIDE elements apart,
    and their contiguous copies. On the GPU (`gpu` marker) the 4.3 GB are real device memory and the
    kernels are the compiled WIDE_INDEX variants."""
    # Per device: on a GPU machine the CPU params have no interpreter, and the CUDA ones need no interpreter.
    if not triton_available(torch.device(request.param)):
        pytest.skip(f"triton cannot run on {request.param} here")
    per_tensor = HEADS * SEQ * DIM
    try:
        storage = torch.empty((BATCH - 1) * BATCH_STRIDE + 3 * per_tensor, dtype=torch.float16, device=request.param)
    except RuntimeError as exc:  # an address space too small for the lazy allocation
        pytest.skip(f"cannot reserve {2 * (BATCH - 1) * BATCH_STRIDE / 2**30:.1f} GiB of address space: {exc}")
    generator = torch.Generator().manual_seed(31)
    views, copies = [], []
    for i in range(3):
        view = storage.as_strided((BATCH, HEADS, SEQ, DIM), (BATCH_STRIDE, SEQ * DIM, DIM, 1), i * per_tensor)
        view.copy_(torch.randn(view.shape, generator=generator).to(view.device))
        views.append(view)
        copies.append(view.contiguous())
    yield views, copies
    del views, storage


def _assert_close(got, want, what):
    err = max_err(got, want)
    assert err <= 2e-3, f"{what}: error {err:.3e} (a wrapped offset read the wrong rows)"


def test_engine_forward_reads_past_2_31(far_apart_qkv):
    (q, k, v), (qc, kc, vc) = far_apart_qkv
    assert wide_index(q) and not wide_index(qc, None)  # the int64 kernel variant only where it is needed
    layout = random_block_layout(BATCH, HEADS, SEQ, SEQ, 16, 16, 0.6, causal=True, seed=3, device=q.device)
    out = block_sparse_attn(q, k, v, layout)
    ref, _ = block_sparse_attention_reference(qc, kc, vc, layout)
    _assert_close(out, ref, "engine forward")


def test_moba_forward_reads_past_2_31(far_apart_qkv):
    (q, k, v), (qc, kc, vc) = far_apart_qkv
    out = moba_attn(q, k, v, block_size=16, topk=2)
    routes = moba_route(qc, kc, block_size=16, topk=2)
    ref, _ = moba_attention_reference(qc, kc, vc, routes, block_size=16)
    _assert_close(out, ref, "MoBA forward")


def test_xattention_estimate_reads_past_2_31(far_apart_qkv):
    (q, k, _), (qc, kc, _) = far_apart_qkv
    scores = xattention_estimate(q, k, stride=4, block_size=16)
    ref = xattention_estimate_reference(qc, kc, stride=4, block_size=16)
    _assert_close(scores, ref, "XAttention estimate")


def test_batch_and_heads_take_their_own_grid_axes():
    """CUDA caps grid axes 1 and 2 at 65535: 2048 packed sequences of 32 heads fit only with batch and
    heads apart; past the limit a launch raises before the kernel."""
    assert batch_head_grid(7, 32, 2048) == (7, 32, 2048)
    with pytest.raises(ValueError, match="split the batch"):
        batch_head_grid(1, 8, MAX_GRID_YZ + 1)
    with pytest.raises(ValueError, match="65535"):
        batch_head_grid(1, MAX_GRID_YZ + 1, 1)


@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="triton cannot run on the CPU here")
def test_a_batch_past_the_grid_limit_is_refused_by_the_kernels():
    q = torch.zeros(MAX_GRID_YZ + 1, 1, 16, 16, dtype=torch.float16)
    layout = random_block_layout(1, 1, 16, 16, 16, 16, 1.0, causal=True, seed=0)
    with pytest.raises(ValueError, match="at most 65535 sequences"):
        block_sparse_attn(q, q, q, layout, backend="triton")


@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="triton cannot run on the CPU here")
def test_indexer_heads_past_2_31():
    """q (M, H, D) whose heads lie BATCH_STRIDE elements apart (a transposed [H, M, D] buffer at long
    context): the kernel widens the head offsets too. q starts at 2^31, so a wrapped offset reads mapped
    memory (a wrong score) rather than crashing the run."""
    rows, heads, dim, keys = 8, 3, 16, 64
    base = 1 << 31
    try:
        storage = torch.empty(base + (heads - 1) * BATCH_STRIDE + rows * dim, dtype=torch.float16)
    except RuntimeError as exc:
        pytest.skip(f"cannot reserve the address space: {exc}")
    q = storage.as_strided((rows, heads, dim), (dim, BATCH_STRIDE, 1), base)
    generator = torch.Generator().manual_seed(7)
    q.copy_(torch.randn(q.shape, generator=generator))
    k = torch.randn(keys, dim, generator=generator).half()
    weights = torch.rand(rows, heads, generator=generator)
    ks, ke = torch.zeros(rows, dtype=torch.int32), torch.full((rows,), keys, dtype=torch.int32)
    assert wide_index(q)
    got = dsa_indexer_logits(q, k, weights, ks, ke)
    want = dsa_indexer_logits_reference(q.contiguous(), k, weights, ks, ke)
    _assert_close(got, want, "indexer scores")


def test_indexer_scan_of_a_long_packed_batch_fits_the_grid(monkeypatch):
    """The flat DSA scan over 2^24 + 64 packed keys (128 sequences at 128K): its tile programs stay within
    grid axis 1 (more tiles per program) and still cover every key. Records the launch, runs nothing."""
    from sparse_attn.kernels import indexer_scores

    launches = []

    class Recorder:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs["TILES_PER_PROGRAM"], kwargs["BLOCK_N"]))

    monkeypatch.setattr(indexer_scores, "launcher", Recorder)
    keys = (1 << 24) + 64
    k = torch.zeros(1, 16, dtype=torch.float16).expand(keys, 16)  # no memory behind the keys
    q, weights = torch.zeros(1, 2, 16, dtype=torch.float16), torch.ones(1, 2)
    bounds = torch.zeros(1, dtype=torch.int32), torch.full((1,), keys, dtype=torch.int32)
    indexer_scores.indexer_scores_op(q, k, weights, *bounds, None)
    [(grid, per_program, block_n)] = launches
    assert grid[1] <= MAX_GRID_YZ and grid[1] * per_program * block_n >= keys
