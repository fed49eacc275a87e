import contextlib
import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests run on the H100 through scripts/gpu_check.sh; on a CPU machine they are skipped, visibly.
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: each test draws its own inputs, reproducibly."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def kernels_with_tma(monkeypatch):
    """The query-major kernels with K/V through tensor descriptors (the `tma` tile option, every
    head-dim bound); yields, per launch that asked for them, whether descriptors were made."""
    from sparse_attn import tiles
    from sparse_attn.kernels import launch

    made = []
    real = launch._kv_descriptors

    def spy(k, v, config):
        descriptors = real(k, v, config)
        made.append(descriptors is not None)
        return descriptors

    monkeypatch.setattr(launch, "_kv_descriptors", spy)
    with contextlib.ExitStack() as stack:
        for kernel in tiles.TMA_KERNELS:
            for bound in tiles.HEAD_DIM_BOUNDS:
                stack.enter_context(tiles.override(kernel, bound, tiles.TABLE[kernel][bound]._replace(tma=True)))
        yield made


# Triton kernels run under the interpreter where no GPU is present; this must precede importing triton.
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
