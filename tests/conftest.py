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


# Triton kernels run under the interpreter where no GPU is present; this must precede importing triton.
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
