import contextlib
import os
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
    """A generator seeded from the test id: each test draws its own inputs, reproducibly.
    SPARSE_ATTN_TEST_SEED (any text) salts every seed, for a fresh draw of the whole suite's inputs."""
    salt = os.environ.get("SPARSE_ATTN_TEST_SEED", "")
    return torch.Generator().manual_seed(zlib.crc32((salt + request.node.nodeid).encode()))


@pytest.fixture
def reference_engine(monkeypatch):
    """Run the kernels' callers through their PyTorch paths (the Triton interpreter is exact but slow; the
    kernels have their own tests): the HF integration's tests."""
    # Triton reads TRITON_INTERPRET when a kernel module is first imported: import them in the
    # process's own mode first, so other tests still find interpreted kernels.
    import sparse_attn.kernels.block_scores  # noqa: F401
    import sparse_attn.kernels.block_sparse_attn  # noqa: F401
    import sparse_attn.kernels.indexer_scores  # noqa: F401
    import sparse_attn.kernels.s2o_attn  # noqa: F401
    import sparse_attn.kernels.token_sparse_attn  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def strided_views():
    """views(q, k, v) -> (leaves, views): the same values as q, k, v through the strides callers hand
    in, as fresh fp32 leaves: q a transposed view (head dim not contiguous), k expanded over the batch
    (stride 0; k's batch rows must be equal), v a slice of a longer sequence."""

    def views(q, k, v):
        q_leaf = q.detach().transpose(-1, -2).contiguous().requires_grad_()
        k_leaf = k.detach()[:1].clone().requires_grad_()
        v_leaf = torch.cat([v.detach(), torch.zeros_like(v.detach())], dim=2).requires_grad_()
        return (q_leaf, k_leaf, v_leaf), (q_leaf.transpose(-1, -2), k_leaf.expand_as(k), v_leaf[:, :, : v.shape[2]])

    return views


class DescriptorProbe:
    """`made`: per launch that asked for K/V tensor descriptors, whether it got them."""

    def __init__(self):
        self.made = []

    @staticmethod
    def _tiles(tma: bool):
        from sparse_attn import tiles

        stack = contextlib.ExitStack()
        for kernel in tiles.TMA_KERNELS:
            for bound in tiles.HEAD_DIM_BOUNDS:
                stack.enter_context(tiles.override(kernel, bound, tiles.TABLE[kernel][bound]._replace(tma=tma)))
        return stack

    def assert_bit_identical_to_pointer_loads(self, run):
        """run() through descriptors equals run() with masked pointer loads, bit for bit: on packed
        sequences a descriptor tile runs into the next sequence's keys, which the key mask zeroes exactly."""
        with_descriptors = run()
        assert self.made and all(self.made), self.made
        with self._tiles(tma=False):
            pointer_loads = run()
        for a, b in zip(with_descriptors, pointer_loads):
            assert torch.equal(a, b)


@pytest.fixture
def kernels_with_tma(monkeypatch):
    """The query-major kernels with K/V through tensor descriptors (the `tma` tile option, every
    head-dim bound); yields a DescriptorProbe."""
    from sparse_attn.kernels import launch

    probe = DescriptorProbe()
    real = launch._descriptors

    def spy(tensors, block_shape):
        descriptors = real(tensors, block_shape)
        probe.made.append(descriptors is not None)
        return descriptors

    monkeypatch.setattr(launch, "_descriptors", spy)
    with probe._tiles(tma=True):
        yield probe


class WarpSpecializeProbe:
    """`made`: per launch of a kernel whose tile asks for `ws` (forward, dQ, dK/dV in launch order),
    whether it got the warp-specialised path."""

    def __init__(self):
        self.made = []

    @staticmethod
    def small_tiles(head_dim: int, ws: bool = True):
        """16x16 tiles, ws or not, for every warp-specialised kernel at this head dim: the
        interpreter's speed, and the same tiles in the same order on both paths."""
        from sparse_attn import tiles

        stack = contextlib.ExitStack()
        for kernel in tiles.WS_KERNELS:
            tile = tiles.Tile(16, 16, 4, 1, ws=ws)
            stack.enter_context(tiles.override(kernel, tiles.head_dim_bound(head_dim), tile))
        return stack


@pytest.fixture
def warp_specialized(monkeypatch):
    """The engine's kernels with their `ws` tiles (tiles.WS_TILES; the default where a head-dim
    bound has none); yields a WarpSpecializeProbe."""
    from sparse_attn import _engine_ops, tiles

    probe = WarpSpecializeProbe()
    real = _engine_ops.warp_specialize_args

    def spy(config, *args, **tensors):
        flags = real(config, *args, **tensors)
        probe.made.append(flags["WARP_SPECIALIZE"])
        return flags

    monkeypatch.setattr(_engine_ops, "warp_specialize_args", spy)
    with contextlib.ExitStack() as stack:
        for kernel, by_bound in tiles.WS_TILES.items():
            for bound, tile in by_bound.items():
                stack.enter_context(tiles.override(kernel, bound, tile))
        yield probe


# Triton kernels run under the interpreter where no GPU is present; this must precede importing triton.
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
