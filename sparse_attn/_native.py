"""Guarded loading of the compiled extension and the report of which backends work here."""

from __future__ import annotations

import importlib.util
import warnings

import torch

REBUILD_HINT = "SPARSE_ATTN_FORCE_BUILD=1 pip install --no-build-isolation --no-cache-dir ."

try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.sparse_attn kernels)

    HAS_NATIVE = True
    NATIVE_ERROR: str | None = None
except (ImportError, OSError) as exc:  # a missing or ABI-broken build must not break the package
    HAS_NATIVE = False
    NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"sparse_attn: the native extension could not be loaded ({NATIVE_ERROR}); "
        f"falling back to the Triton and PyTorch paths. To build it: {REBUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )

NATIVE_OPS = (
    "block_mean_pool",
    "topk_rows",
    "threshold_select",
    "layout_transpose",
    "moba_route",
    "moba_route_means",
    "moba_route_varlen",
    "block_sparse_decode",
)


def _lookup_kernel(op_name: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_attn::{op_name}", dispatch_key)
    except RuntimeError:  # an extension built before the op existed
        return False


# Looked up once: a plain set membership test is also what torch.compile can trace.
NATIVE_KERNELS = frozenset(
    (op, key) for op in NATIVE_OPS for key in ("CPU", "CUDA") if HAS_NATIVE and _lookup_kernel(op, key)
)


def _has_kernel(op_name: str, dispatch_key: str) -> bool:
    return (op_name, dispatch_key) in NATIVE_KERNELS


def native_available(device: str | torch.device = "cpu") -> bool:
    """Whether the compiled ops run on tensors of this device type ('cpu' or 'cuda')."""
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    return all(_has_kernel(op, key) for op in NATIVE_OPS)


def _module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        module = __import__(name)
    except Exception as exc:  # an installed but broken package is reported, not raised
        return f"broken ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "installed")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


_NO_GPU = "no GPU: the engine and MoBA use their PyTorch paths"


def backend_report() -> dict[str, object]:
    """Which backends work on this machine, as `python -m sparse_attn info` prints them."""
    cuda_ok = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda,
        "CUDA device": torch.cuda.get_device_name() if cuda_ok else None,
        "native extension": "loaded" if HAS_NATIVE else f"missing ({NATIVE_ERROR})",
        "native CPU ops": native_available("cpu"),
        "native CUDA ops": native_available("cuda"),
        "triton": _module_version("triton"),
        "triton mode": "GPU" if cuda_ok else ("interpreter (TRITON_INTERPRET=1)" if _interpreting() else _NO_GPU),
        "transformers": _module_version("transformers"),
        "flash_attn": _module_version("flash_attn"),
    }
