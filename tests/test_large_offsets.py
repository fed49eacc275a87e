"""Element offsets past 2^31 in the Triton kernels' pointer arithmetic.

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
from sparse_attn.kernels.launch import wide_index
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
