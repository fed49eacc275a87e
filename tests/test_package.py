"""Packaging: the guarded import, the fallback paths, the CLI and the wheel."""

import os
import subprocess
import sys
import textwrap

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


def test_selfcheck_fails_on_nan_and_skips_only_missing_backends(monkeypatch, capsys):
    """A NaN error (a broken fast path) fails; None (the backend is not here) skips."""
    import argparse

    from sparse_attn import __main__ as cli

    cases = [("missing backend", lambda: None, 0.0), ("exact", lambda: 0.0, 0.0)]
    monkeypatch.setattr(cli, "_selfcheck_cases", lambda device: cases)
    assert cli._selfcheck(argparse.Namespace(device="cpu")) == 0
    assert "skip missing backend" in capsys.readouterr().out
    cases.append(("broken", lambda: torch.tensor(float("nan")), 1.0))
    assert cli._selfcheck(argparse.Namespace(device="cpu")) == 1
    assert "FAIL broken" in capsys.readouterr().out


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv():
    """The CPU wheel: built, installed into a fresh environment that sees torch but not this
    checkout, imported from there with its native CPU ops (scripts/wheel_check.sh asserts each)."""
    # Without PYTHONPATH: a checkout on it (with its egg-info) would pass for the installed package.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    check = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "wheel_check.sh"), sys.executable],
        capture_output=True,
        text=True,
        env={**env, "SPARSE_ATTN_SKIP_CUDA_BUILD": "1"},
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "[wheel] " in check.stdout and "site-packages/sparse_attn" in check.stdout
