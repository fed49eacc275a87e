"""The benchmark CLI's --quick mode runs on the CPU and writes complete JSON."""

import json

import pytest

from sparse_attn.bench.__main__ import SUITES, main

EXPECTED = {
    "engine": ("seq_len", "density", "pairs", "block_sparse_attn_ms", "block_sparse_attn_fwd_bwd_ms", "sdpa_cpu_ms"),
    "decode": ("seq_len_q", "density", "selected_kv_bytes", "block_sparse_decode_ms", "block_sparse_decode_gbps"),
    "moba": ("seq_len", "block", "topk", "routed_pairs", "moba_fwd_ms", "moba_fwd_bwd_ms", "speedup_over_sdpa_cpu"),
    "xattention": (
        "seq_len",
        "stride",
        "threshold",
        "density",
        "mass_recall",
        "output_rel_error",
        "estimate_ms",
        "select_ms",
        "xattention_ms",
        "speedup_over_sdpa_cpu",
    ),
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_quick_suite_writes_json(tmp_path, suite):
    out = tmp_path / f"{suite}.json"
    assert main([suite, "--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["suite"] == suite and payload["mode"] == "quick"
    for field in ("device", "torch", "triton", "date"):
        assert field in payload["environment"]
    assert payload["results"], "no rows"
    for row in payload["results"]:
        missing = [key for key in EXPECTED[suite] if key not in row]
        assert not missing, f"{suite} row lacks {missing}"
        assert all(row[key] > 0 for key in row if key.endswith("_ms"))
