"""How the ops launch a Triton kernel: through `torch.library.wrap_triton`, so torch.compile traces
it, with K/V tensor descriptors for the kernels whose tile asks for them (`tma`), and device-side
descriptors with a scratch allocator for the warp-specialised ones (`ws`)."""

import contextlib
import os

import torch
import triton
from torch.library import wrap_triton


def launcher(kernel):
    """`wrap_triton(kernel)`, indexed by the grid like the kernel itself, launched on its tensors' GPU.

    torch releases before 2.13 reject the interpreter's kernels (TRITON_INTERPRET=1) there; an
    eager launch runs them unwrapped. torch.compile does not trace the interpreter's kernels on any
    release (2.13 hands them back unwrapped, so they run on fake tensors): compiling the Triton
    path needs CUDA, and on the CPU `backend="reference"` compiles (the oracles run eagerly).
    """
    try:
        wrapped = wrap_triton(kernel)
    except RuntimeError:
        if os.environ.get("TRITON_INTERPRET") == "1":
            wrapped = kernel
        else:
            raise
    return _OnTensorsDevice(wrapped)


class _OnTensorsDevice:
    """Triton launches on `torch.cuda.current_device()` whatever its pointers' device, so a layer
    placed on another GPU (a model split with `device_map="auto"`) would run on the wrong one: the
    launch makes the first tensor argument's GPU current for its duration."""

    def __init__(self, kernel):
        self._kernel = kernel

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            with _device_of(args, kwargs):
                return launch(*args, **kwargs)

        return run


def _device_of(args, kwargs):
    """A context making the tensors' GPU current, or a no-op where it already is (or there is no real
    CUDA tensor: the interpreter's CPU tensors, and the fake ones torch.compile traces with, whose
    generated code places its kernels itself)."""
    tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    on_gpu = tensor is not None and not _traced(tensor) and tensor.device.type == "cuda"
    if not on_gpu or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def wide_index(*tensors) -> bool:
    """Whether any tensor spans 2^31 elements or more from its base (the largest element offset its
    strides reach): the kernels then compute offsets in int64 (WIDE_INDEX), which costs registers."""
    reach = (
        sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) for t in tensors if t is not None
    )
    return any(offset >= 2**31 for offset in reach)


# CUDA caps a grid's second and third axes at 65535 programs; the first takes 2^31 - 1.
MAX_GRID_YZ = 65535


def batch_head_grid(tiles: int, heads: int, batch: int) -> tuple[int, int, int]:
    """(tiles, heads, batch): the kernels read the head from program_id(1) and the batch (or packed
    sequence) from program_id(2), so each has the 65535 programs of its own axis (batch x heads on one
    axis would overflow at 2048 packed sequences of 32 heads). Launch order is that of (tiles, batch x heads)."""
    if heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(
            f"a kernel launch takes at most {MAX_GRID_YZ} sequences (the batch, or the sequences of cu_seqlens) "
            f"and {MAX_GRID_YZ} heads, got {batch} and {heads}; split the batch"
        )
    return (tiles, heads, batch)


def _tma_addressable(t) -> bool:
    """Whether TMA can address t (batch, head, seq, dim): strides that are positive multiples of 16
    bytes (a size-1 axis may take any) and a 16-byte aligned base."""
    stepped = [axis for axis in range(t.dim() - 1) if t.shape[axis] > 1]
    return t.numel() > 0 and _aligned_base(t) and _steps_aligned(t, stepped)


def _steps_aligned(t, axes) -> bool:
    """Whether t's strides on `axes` are positive multiples of 16 bytes, as TMA steps them."""
    return all(t.stride(axis) > 0 and t.stride(axis) * t.element_size() % 16 == 0 for axis in axes)


def _traced(t) -> bool:
    """Whether t is one of the tensors torch.compile traces with (no storage, no real device)."""
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


def _aligned_base(t) -> bool:
    return _traced(t) or t.data_ptr() % 16 == 0


def _descriptor(t, block_shape):
    """A host-side tensor descriptor over t (batch, head, seq, dim), or None where TMA cannot address it."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not _tma_addressable(t):
        return None
    unit = 16 // t.element_size()  # any stride on a size-1 axis: TMA needs one it accepts
    strides = [stride if extent > 1 else unit for stride, extent in zip(t.stride()[:-1], t.shape[:-1])]
    return TensorDescriptor(t, list(t.shape), [*strides, 1], block_shape)


def _descriptors(tensors: dict, block_shape):
    """name -> descriptor for every tensor, or None unless TMA can address them all."""
    descriptors = {name: _descriptor(t, block_shape) for name, t in tensors.items()}
    return None if None in descriptors.values() else descriptors


def descriptor_args(config: dict, rows: str, **tensors) -> dict:
    """NAME_DESC for each tensor (batch, head, seq, dim), with [1, 1, config[rows], HEAD_DIM_PAD]
    boxes, and USE_TMA, for a kernel with a descriptor path; takes USE_TMA out of `config`.
    Descriptors when the tile asks for them and TMA can address every tensor, else pointer loads."""
    block_shape = [1, 1, config[rows], config["HEAD_DIM_PAD"]]
    descriptors = _descriptors(tensors, block_shape) if config.pop("USE_TMA") else None
    args = {f"{name}_DESC": (descriptors or {}).get(name) for name in tensors}
    return {**args, "USE_TMA": descriptors is not None}


def _device_descriptors(device) -> bool:
    """Whether kernels can make tensor descriptors on the device: Hopper or later, or the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors live in a global scratch buffer that Triton takes from its allocator:
    set one (torch's caching allocator) unless the caller has set their own."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def _stats_addressable(t) -> bool:
    """Whether a kernel can read rows of t (fp32 [B, H, S], LSE or delta) through descriptors: contiguous, and
    each head's row 16-byte aligned."""
    return t.numel() > 0 and t.is_contiguous() and t.shape[-1] * t.element_size() % 16 == 0 and _aligned_base(t)


def warp_specialize_args(config: dict, grouped: tuple = (), stats: tuple = (), **tensors) -> dict:
    """WARP_SPECIALIZE for a kernel whose tile asks for it (takes it out of `config`): on where the
    device can make tensor descriptors and TMA can address every tensor, else the pointer path.
    `grouped`: the tensors read through descriptors that span a GQA group's heads; `stats`: row
    statistics (LSE, delta) read through descriptors too."""
    wanted = config.pop("WARP_SPECIALIZE")
    on = wanted and _device_descriptors(next(iter(tensors.values())).device)
    # The kernel's descriptors step rows (and a group's heads) by their strides even where that
    # axis has one entry.
    on = on and all(_steps_aligned(t, (-3, -2) if name in grouped else (-2,)) for name, t in tensors.items())
    on = on and all(_tma_addressable(t) for t in tensors.values()) and all(_stats_addressable(t) for t in stats)
    if on:
        _ensure_allocator()
    return {"WARP_SPECIALIZE": bool(on)}
