"""Bad arguments to the raw native ops raise ValueError/TypeError and never crash the process.

Each op is called in a child process, so a crash (the H100 run of 2026-11-24 saw a segfault on the
CUDA moba_route's ranked-blocks error path) fails one test instead of ending the pytest run, and the
child's output names the call that crashed. The public wrappers check their arguments before the
ops; these calls go to the ops directly, as torch.compile'd or third-party code may.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_attn

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: argv[1] is the device; one line per call, "<name>: <outcome>".
CHILD = r"""
import sys
import torch
import sparse_attn  # noqa: F401  (registers the ops)

ops = torch.ops.sparse_attn
device = sys.argv[1]
q = torch.randint(-3, 4, (1, 2, 64, 64), device=device).half()
k = torch.randint(-3, 4, (1, 1, 100, 64), device=device).half()
means = torch.zeros(1, 1, 99, 64, device=device)
scores = torch.randn(4, 10, device=device)
counts = torch.ones(1, 1, 1, dtype=torch.int32, device=device)
indices = torch.full((1, 1, 1, 1), 99, dtype=torch.int32, device=device)
calls = {
    "moba_route block_size 0": lambda: ops.moba_route(q, k, 0, 4, True),
    "moba_route dtype mismatch": lambda: ops.moba_route(q, k.float(), 1, 4, True),
    "moba_route_means kv_len past the means": lambda: ops.moba_route_means(q, means, 10**6, 1, 4, True),
    "topk_rows k negative": lambda: ops.topk_rows(scores, -1),
    "block_mean_pool 3-D keys": lambda: ops.block_mean_pool(k[0], 4),
    "block_sparse_decode block index outside": lambda: ops.block_sparse_decode(
        q[:, :, :1], k, k, counts, indices, 16, True, 0.125, 1
    ),
    "block_sparse_decode negative scale": lambda: ops.block_sparse_decode(
        q[:, :, :1], k, k, counts, indices * 0, 16, True, -0.125, 1
    ),
    "block_sparse_decode negative splits": lambda: ops.block_sparse_decode(
        q[:, :, :1], k, k, counts, indices * 0, 16, True, 0.125, -3
    ),
}
if device == "cuda":  # the CUDA router's limit: at most 64 ranked blocks per row
    calls["moba_route ranked blocks 65 causal"] = lambda: ops.moba_route(q, k, 1, 66, True)
    calls["moba_route ranked blocks 65 non-causal"] = lambda: ops.moba_route(q, k, 1, 65, False)
for name, call in calls.items():
    print(f"{name}: ", end="", flush=True)  # a crash leaves the name without an outcome
    try:
        call()
        print("returned", flush=True)
    except (ValueError, TypeError) as exc:
        print(type(exc).__name__, flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
"""


def _run_child(device: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, device], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    lines = child.stdout.splitlines()
    assert child.returncode == 0, f"the child exited with {child.returncode}:\n{child.stdout}\n{child.stderr[-3000:]}"
    assert lines, child.stderr[-3000:]
    wrong = [line for line in lines if not line.endswith((": ValueError", ": TypeError"))]
    assert not wrong, "calls that did not raise ValueError/TypeError:\n" + "\n".join(wrong)


@pytest.mark.skipif(not sparse_attn.native_available("cpu"), reason="native CPU ops not built")
def test_cpu_ops_raise_on_bad_arguments():
    _run_child("cpu")


@pytest.mark.gpu
def test_cuda_ops_raise_on_bad_arguments():
    assert sparse_attn.native_available("cuda"), "the CUDA ops were not built"
    _run_child("cuda")


def test_route_limit_is_checked_before_the_cuda_op():
    """The public router's own check of the CUDA limit (the device is only read for its type)."""
    from sparse_attn.methods.moba import CUDA_MAX_RANKED_BLOCKS, _check_cuda_route_limit

    cuda = torch.device("cuda")
    limit = CUDA_MAX_RANKED_BLOCKS
    _check_cuda_route_limit(cuda, limit, limit + 1, True)  # causal: the current block is not ranked
    _check_cuda_route_limit(cuda, limit, 10 * limit, False)  # only `limit` blocks exist
    _check_cuda_route_limit(cuda, limit + 1, 10 * limit, True)  # a causal row ranks all blocks but its own
    _check_cuda_route_limit(torch.device("cpu"), 10 * limit, 10 * limit, False)  # no limit on the CPU
    _check_cuda_route_limit(cuda, lambda: pytest.fail("counted blocks for a small topk"), limit, False)
    for topk, causal in ((limit + 2, True), (limit + 1, False)):
        with pytest.raises(ValueError, match=f"at most {limit}"):
            _check_cuda_route_limit(cuda, lambda: 10 * limit, topk, causal)
    with pytest.raises(ValueError, match=f"these {limit + 2} KV blocks would need {limit + 1}"):
        _check_cuda_route_limit(cuda, limit + 2, 10 * limit, True)
