"""The benchmark CLI: `all --quick` runs on the CPU and writes complete JSON, report.md and plots;
rows out of bounds are flagged in the tables; the MoBA Flex peer's mask is MoBA's selection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_attn.bench import report
from sparse_attn.bench.__main__ import main
from sparse_attn.bench.suites import SUITES
from sparse_attn.reference import block_sparse_attention_reference

ROOT = Path(__file__).resolve().parents[1]

# Fields every row carries on every device (peak memory is None off CUDA).
COMMON = (
    "density",
    "output_rel_error",
    "error_bound",
    "error_rule",
    "error_reference",
    "error_ok",
    "error_flags",
    "speedup_over_best_dense",
    "best_dense_peer",
)
EXPECTED = {
    "engine": (
        "seq_len",
        "pairs",
        "block_sparse_attn_ms",
        "block_sparse_attn_tflops",
        "block_sparse_attn_first_call_ms",
        "block_sparse_attn_peak_bytes",
        "block_sparse_attn_fwd_bwd_ms",
        "sdpa_cpu_ms",
        "sdpa_cpu_fwd_bwd_ms",
        "reference_ms",
        "reference_fwd_bwd_ms",
        "reference_output_rel_error",
    ),
    "decode": (
        "seq_len_q",
        "seq_len_kv",
        "selected_kv_bytes",
        "block_sparse_decode_ms",
        "block_sparse_decode_gbps",
        "block_sparse_decode_first_call_ms",
        "block_sparse_decode_peak_bytes",
        "sdpa_cpu_ms",
        "reference_ms",
    ),
    "moba": (
        "seq_len",
        "block",
        "topk",
        "routed_pairs",
        "mass_recall",
        "kernel_rel_error",
        "kernel_error_bound",
        "route_ms",
        "moba_fwd_ms",
        "moba_fwd_tflops",
        "moba_fwd_first_call_ms",
        "moba_fwd_bwd_ms",
        "moba_fwd_bwd_peak_bytes",
        "speedup_over_sdpa_cpu",
        "reference_fwd_bwd_ms",
    ),
    "moba_decode": (
        "seq_len_kv",
        "block",
        "topk",
        "selected_kv_bytes",
        "moba_decode_ms",
        "moba_decode_gbps",
        "moba_decode_first_call_ms",
        "moba_decode_peak_bytes",
        "moba_decode_pooling_ms",
        "pooling_over_followed",
        "moba_route_ms",
        "block_sparse_decode_ms",
        "reference_ms",
        "sdpa_cpu_ms",
        "mass_recall",
        "output_rel_error_vs_dense",
    ),
    "moba_varlen": (
        "seq_len",
        "documents",
        "max_document_len",
        "routed_pairs",
        "mass_recall",
        "kernel_rel_error",
        "kernel_error_bound",
        "error_document_len",
        "route_fused_ms",
        "route_per_document_ms",
        "fused_route_speedup",
        "moba_fwd_ms",
        "moba_fwd_bwd_ms",
        "moba_fwd_bwd_tflops",
        "moba_fwd_bwd_peak_bytes",
        "sdpa_cpu_fwd_bwd_ms",
        "reference_fwd_bwd_ms",
    ),
    "xattention": (
        "seq_len",
        "stride",
        "threshold",
        "mass_recall",
        "kernel_rel_error",
        "kernel_error_bound",
        "estimate_ms",
        "select_ms",
        "attention_ms",
        "attention_tflops",
        "xattention_ms",
        "xattention_first_call_ms",
        "xattention_peak_bytes",
        "speedup_over_sdpa_cpu",
        "reference_ms",
        "reference_output_rel_error",
    ),
    "proxyattn": (
        "seq_len",
        "gamma",
        "mass_recall",
        "kernel_rel_error",
        "kernel_error_bound",
        "estimate_ms",
        "budget_ms",
        "select_ms",
        "attention_ms",
        "attention_tflops",
        "proxyattn_ms",
        "proxyattn_first_call_ms",
        "proxyattn_peak_bytes",
        "speedup_over_sdpa_cpu",
        "reference_ms",
        "reference_output_rel_error",
    ),
    "s2o": (
        "seq_len",
        "stop_rule",
        "tau",
        "mass_recall",
        "kernel_rel_error",
        "kernel_error_bound",
        "plan_ms",
        "attention_ms",
        "attention_tflops",
        "s2o_ms",
        "s2o_first_call_ms",
        "s2o_peak_bytes",
        "speedup_over_best_dense",
        "block_topk_rel_error",
        "mse_ratio_block_topk_over_s2o",
        "pbs_rel_error",
        "pbs_density_sampled",
        "sdpa_cpu_ms",
    ),
    "hisa": (
        "seq_len",
        "block_topk",
        "dsa_ms",
        "hisa_ms",
        "hisa_first_call_ms",
        "hisa_peak_bytes",
        "sparse_mla_ms",
        "iou_mean",
        "iou_min",
        "kernel_rel_error",
        "kernel_error_bound",
    ),
}
ENVIRONMENT = ("date", "device", "driver", "torch", "triton", "cuda", "backends")


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    """`all --quick` once, as the main job runs it: its own process, without the Triton interpreter
    the test session turns on (the CLI on a CPU uses the PyTorch paths)."""
    out = tmp_path_factory.mktemp("bench-quick")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "sparse_attn.bench", "all", "--quick", "--out-dir", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_quick_suite_json_has_every_field(quick_dir, suite):
    payload = json.loads((quick_dir / f"{suite}.json").read_text())
    assert payload["suite"] == suite and payload["mode"] == "quick"
    assert all(field in payload["environment"] for field in ENVIRONMENT)
    assert payload["config"]["error_rule"], "the error bound must be documented in the config"
    assert payload["results"], "no rows"
    for row in payload["results"]:
        missing = [key for key in COMMON + EXPECTED[suite] if key not in row]
        assert not missing, f"{suite} row lacks {missing}"
        assert all(row[key] > 0 for key in row if key.endswith("_ms") and row[key] is not None)
        assert all(row[key] is None for key in row if key.endswith("_peak_bytes")), "peak memory is CUDA-only"
        assert row["error_ok"], f"{suite} row out of bounds on the CPU: {row['error_flags']}"
        failed = {key: value for key, value in row.items() if key.endswith("_error") and isinstance(value, str)}
        assert not failed, f"{suite}: a CPU peer failed: {failed}"
        assert 0 < row["density"] <= 1


def test_quick_report_has_every_table_and_the_environment(quick_dir):
    text = (quick_dir / "report.md").read_text()
    for title in ("date", "device", "driver", "torch", "triton", "CUDA"):
        assert f"| {title} " in text.splitlines()[2]
    for suite in SUITES:
        assert f"## {suite} (quick)" in text
        assert report.markdown_table([], SUITES[suite].COLUMNS).splitlines()[0] in text
    assert "Error checks: all" in text


def test_quick_plots_exist(quick_dir):
    pytest.importorskip("matplotlib")
    for name in (report.SPEEDUP_PNG, report.PARETO_PNG):
        assert (quick_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (quick_dir / "report.md").read_text()


def test_report_rerenders_from_json_without_matplotlib(quick_dir, tmp_path, monkeypatch, capsys):
    for suite in SUITES:
        (tmp_path / f"{suite}.json").write_text((quick_dir / f"{suite}.json").read_text())
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    assert main(["report", str(tmp_path)]) == 0
    assert "plots skipped" in capsys.readouterr().out
    rendered = (tmp_path / "report.md").read_text()
    assert rendered == (quick_dir / "report.md").read_text().replace(
        f"![speedup over the fastest dense peer]({report.SPEEDUP_PNG})\n\n", ""
    ).replace(f"![error against dense vs density]({report.PARETO_PNG})\n\n", "")
    assert not (tmp_path / report.SPEEDUP_PNG).exists()


def test_single_suite_writes_json(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["decode", "--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["suite"] == "decode" and payload["results"]
    assert all(row["error_ok"] for row in payload["results"])


def test_out_of_bounds_rows_are_flagged():
    columns = [("S", "seq_len", "d"), ("err", "output_rel_error", ".3f"), ("check", "error_ok", "flag")]
    rows = [
        {"seq_len": 256, "output_rel_error": 0.1, "error_ok": True, "error_flags": []},
        {"seq_len": 512, "output_rel_error": 2.5, "error_ok": False, "error_flags": ["vs dense"]},
        {"seq_len": 1024, "output_rel_error": float("nan"), "error_ok": False, "error_flags": ["kernel"]},
    ]
    lines = report.markdown_table(rows, columns).splitlines()
    assert lines[2] == "| 256 | 0.100 | ok |"
    assert lines[3] == f"| 512 | 2.500 | {report.FLAG} (vs dense) |"
    assert lines[4] == f"| 1024 | NaN | {report.FLAG} (kernel) |"
    summary = report.error_summary({"moba": {"results": rows}})
    assert report.FLAG in summary and "2 of 3" in summary


def test_finish_flags_nan_and_kernel_errors():
    from sparse_attn.bench.quality import finish

    nan_row = finish({"output_rel_error": float("nan"), "error_bound": 1.0, "error_reference": "dense"})
    assert not nan_row["error_ok"] and nan_row["error_flags"] == ["vs dense"]
    kernel = finish({"output_rel_error": 0.1, "error_bound": 1.0, "kernel_rel_error": 1e-3, "kernel_error_bound": 1e-6})
    assert not kernel["error_ok"] and kernel["error_flags"] == ["kernel"]


def test_moba_flex_mask_is_the_routed_selection():
    from torch.nn.attention.flex_attention import create_mask

    from sparse_attn.bench.moba import FLEX_Q_TILE, flex_block_mask
    from sparse_attn.bench.quality import routed_rows
    from sparse_attn.methods.moba import moba_route

    generator = torch.Generator().manual_seed(0)
    seq, block, topk = 300, 32, 3  # a ragged last tile and block
    q, k = (torch.randn(2, 3, seq, 16, generator=generator) for _ in range(2))
    routes = moba_route(q, k, block_size=block, topk=topk)
    block_mask = flex_block_mask(routes, block)
    blocks = block_mask.to_dense().bool()
    tokens = blocks.repeat_interleave(FLEX_Q_TILE, 2).repeat_interleave(block, 3)[:, :, :seq, :seq]
    tokens &= create_mask(block_mask.mask_mod, 2, 3, seq, seq, device="cpu")
    assert torch.equal(tokens, routed_rows(routes, torch.arange(seq), block, seq))


def test_a_failing_peer_is_recorded_and_ours_raises():
    from sparse_attn.bench.common import timed

    def broken():
        raise RuntimeError("no kernel for this shape\nsecond line")

    record = {}
    assert timed(record, "flex", broken, torch.device("cpu")) is None
    assert record["flex_error"] == "RuntimeError: no kernel for this shape"
    with pytest.raises(RuntimeError):
        timed({}, "ours", broken, torch.device("cpu"), peer=False)


def test_all_records_a_failing_suite_and_goes_on(tmp_path, monkeypatch):
    import types

    from sparse_attn.bench import __main__ as cli

    def run(config, device):
        raise RuntimeError("kernel launch failed")

    broken = types.SimpleNamespace(
        QUICK={}, FULL={}, ERROR_RULE="-", COLUMNS=SUITES["decode"].COLUMNS, SPEEDUP="-", SEQ_KEY="seq_len", run=run
    )
    suites = {"decode": SUITES["decode"], "moba": broken}
    monkeypatch.setattr(cli, "SUITES", suites)
    monkeypatch.setattr(report, "SUITES", suites)
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    assert cli.main(["all", "--quick", "--out-dir", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "moba.json").read_text())["error"] == "RuntimeError: kernel launch failed"
    text = (tmp_path / "report.md").read_text()
    assert "moba (suite failed)" in text and f"{report.FLAG}: the suite failed" in text
    assert json.loads((tmp_path / "decode.json").read_text())["results"]


def test_document_offsets_cut_every_token_into_nonempty_documents():
    from sparse_attn.bench.moba_varlen import document_offsets

    for total, docs in ((512, 16), (100, 100), (7, 1)):
        offsets = document_offsets(total, docs, seed=total, device="cpu")
        assert offsets.dtype == torch.int32 and offsets.numel() == docs + 1
        assert offsets[0] == 0 and offsets[-1] == total and bool((offsets.diff() > 0).all())
    assert torch.equal(document_offsets(512, 16, seed=3, device="cpu"), document_offsets(512, 16, seed=3, device="cpu"))
    with pytest.raises(ValueError, match="num_docs"):
        document_offsets(8, 9, seed=0, device="cpu")


def test_moba_varlen_flex_mask_is_document_causal():
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from sparse_attn.bench.moba_varlen import document_block_mask

    offsets = torch.tensor([0, 5, 130, 131, 300], dtype=torch.int32)
    block_mask = document_block_mask(offsets, 300, "cpu")
    dense = create_mask(block_mask.mask_mod, None, None, 300, 300, device="cpu")[0, 0]
    document = torch.repeat_interleave(torch.arange(4), offsets.diff().long())
    expected = (document[:, None] == document[None, :]) & torch.ones(300, 300, dtype=torch.bool).tril()
    assert torch.equal(dense, expected)
    # The block lists cover every allowed pair (a block the mask needs is never skipped).
    assert torch.equal(
        block_mask.to_dense()[0, 0].repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :300] | ~expected,
        torch.ones(300, 300, dtype=torch.bool),
    )
    # The same partial and full blocks as create_block_mask's dense evaluation (too big at 128K).
    for cuts, total in ((offsets, 300), (torch.tensor([0, 300, 700, 701, 1000], dtype=torch.int32), 1000)):
        ours = document_block_mask(cuts, total, "cpu")
        dense_built = create_block_mask(ours.mask_mod, None, None, total, total, device="cpu")
        for lists in ("kv_num_blocks", "full_kv_num_blocks"):
            assert torch.equal(getattr(ours, lists), getattr(dense_built, lists)), lists
        assert torch.equal(ours.to_dense(), dense_built.to_dense())


@pytest.mark.parametrize("layout_heads", ["kv", "q"])
def test_folded_flex_decode_mask_is_the_layout(layout_heads):
    """Flex's decode peer folds each GQA group into the query axis: its per-KV-head mask must give every
    query head its own selection (a per-query-head layout, as MoBA's routes are) with bottom-right causality."""
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_attn.bench.common import folded_decode_block_mask
    from sparse_attn.testing import random_block_layout

    batch, hq, hkv, seq_q, seq_kv, dim, block = 2, 4, 2, 3, 100, 16, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, seq_q, dim, generator=gen)
    k, v = (torch.randn(batch, hkv, seq_kv, dim, generator=gen) for _ in range(2))
    heads = hkv if layout_heads == "kv" else hq
    layout = random_block_layout(batch, heads, seq_q, seq_kv, block, block, 0.5, causal=True, seed=1)
    block_mask = folded_decode_block_mask(layout, hq, hkv)
    out = flex_attention(q.reshape(batch, hkv, -1, dim), k, v, block_mask=block_mask).reshape(q.shape)
    want, _ = block_sparse_attention_reference(q, k, v, layout)
    torch.testing.assert_close(out, want.to(out.dtype), rtol=1e-4, atol=1e-4)
