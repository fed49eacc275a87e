"""Packaging: the guarded import, the fallback paths, the CLI and the wheel."""

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch

import sparse_attn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **kwargs):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, **kwargs)


def test_missing_extension_warns_once_and_falls_back():
    result = run_python(
        """
        import sys, warnings
        sys.modules["sparse_attn._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparse_attn, torch
        messages = [str(w.message) for w in caught if "native extension" in str(w.message)]
        assert len(messages) == 1 and "SPARSE_ATTN_FORCE_BUILD=1" in messages[0], messages
        assert not sparse_attn.HAS_NATIVE and not sparse_attn.native_available("cpu")
        scores = torch.tensor([[0.1, 3.0, 3.0, -1.0]])
        assert sparse_attn.topk_rows(scores, 2).tolist() == [[1, 2]]
        print("fallback ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_info_reports_backends():
    result = subprocess.run([sys.executable, "-m", "sparse_attn", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for field in ("native CPU ops", "native CUDA ops", "triton", "transformers", "flash_attn"):
        assert field in result.stdout
    assert ("native CPU ops    True" in result.stdout) == sparse_attn.native_available("cpu")


def test_selfcheck_passes():
    """As the main job runs it: without TRITON_INTERPRET in the environment, the self-check selects
    the interpreter itself, which works only if importing the package imported no triton-loading
    module first (torch._dynamo once did, through a compile decorator)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sparse_attn", "selfcheck", "--device", "cpu"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "self-check passed" in result.stdout


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ROOT, "--no-build-isolation", "--no-deps", "-q", "-w", str(wheel_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "SPARSE_ATTN_SKIP_CUDA_BUILD": "1"},
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("sparse_attn-*.whl")
    # The fresh environment sees the installed torch (no download) but not this checkout: a .pth
    # file appends torch's site directory (the base interpreter's, or the virtual environment's the
    # tests run in) after the fresh one's, where the wheel goes. Lines of a .pth file add paths
    # without running that directory's own .pth files, so an editable install there stays inert.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parents[1]
    (Path(purelib) / "outer_torch.pth").write_text(f"{torch_site}\n")
    # Without PYTHONPATH: a checkout on it (with its egg-info) would pass for the installed package.
    clean_env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True, text=True, env=clean_env
    )
    assert install.returncode == 0, install.stderr
    check = subprocess.run(
        [
            python,
            "-c",
            "import sparse_attn, sys; assert sparse_attn.native_available('cpu'); print(sparse_attn.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env,
    )
    assert check.returncode == 0, check.stderr
    assert str(env_dir) in check.stdout
