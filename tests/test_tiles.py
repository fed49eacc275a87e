"""Launch-configuration table: lookup order (override, environment, table), validation, the launch
it reaches, and the tile sweep (`python -m sparse_attn.bench tune`) on the CPU interpreter."""

import json
import subprocess
import sys

import pytest
import torch

from sparse_attn import _engine_ops, tiles
from sparse_attn.bench import tune
from sparse_attn.bench.__main__ import main
from sparse_attn.engine import block_sparse_attn, triton_available
from sparse_attn.kernels import launch
from sparse_attn.reference import block_sparse_attention_reference
from sparse_attn.testing import assert_flash_rule, random_block_layout
from sparse_attn.tiles import Tile

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def no_environment_tiles(monkeypatch):
    monkeypatch.delenv("SPARSE_ATTN_TILES", raising=False)


def test_lookup_is_the_table_by_head_dim_bound():
    assert tiles.lookup("engine_fwd", 128) == tiles.TABLE["engine_fwd"][128]
    assert tiles.lookup("engine_fwd", 96) == tiles.TABLE["engine_fwd"][128]
    assert tiles.lookup("moba_dkdv", 32) == tiles.TABLE["moba_dkdv"][64]
    with pytest.raises(ValueError, match="head dim 512"):
        tiles.lookup("engine_fwd", 512)


def test_override_nests_and_restores():
    default = tiles.lookup("engine_dq", 128)
    with tiles.override("engine_dq", 128, Tile(32, 32, 4, 1)):
        assert tiles.lookup("engine_dq", 100) == Tile(32, 32, 4, 1)
        assert tiles.lookup("engine_dq", 64) == tiles.TABLE["engine_dq"][64]  # other bounds untouched
        with tiles.override("engine_dq", 128, (64, 32, 8, 2)):
            assert tiles.lookup("engine_dq", 128) == Tile(64, 32, 8, 2)
        assert tiles.lookup("engine_dq", 128) == Tile(32, 32, 4, 1)
    assert tiles.lookup("engine_dq", 128) == default


def test_environment_then_override(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_TILES", '{"moba_fwd:128": [32, 64, 4, 3], "engine_dq:64": [64, 32, 4, 2, 1]}')
    assert tiles.lookup("moba_fwd", 128) == Tile(32, 64, 4, 3)
    assert tiles.lookup("engine_dq", 64) == Tile(64, 32, 4, 2, tma=True)
    assert tiles.lookup("moba_dq", 128) == tiles.TABLE["moba_dq"][128]
    with tiles.override("moba_fwd", 128, Tile(16, 16, 4, 1)):
        assert tiles.lookup("moba_fwd", 128) == Tile(16, 16, 4, 1)


@pytest.mark.parametrize(
    "value, message",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"engine_fwd": [64, 64, 4, 2]}', "kernel:head_dim_bound"),
        ('{"nope:128": [64, 64, 4, 2]}', "unknown kernel"),
        ('{"engine_fwd:96": [64, 64, 4, 2]}', "head-dim bound"),
        ('{"engine_fwd:128": [48, 64, 4, 2]}', "powers of two"),
        ('{"engine_fwd:128": [64, 64, 4]}', "BLOCK_M, BLOCK_N, num_warps, num_stages"),
        ('{"engine_fwd:128": [8, 64, 4, 2]}', ">= 16"),
        ('{"moba_dkdv:128": [64, 64, 4, 2, 1]}', "no tensor-descriptor"),
        ('{"engine_fwd:128": [64, 64, 4, 2, 0, 1, 0]}', "BLOCK_M, BLOCK_N, num_warps, num_stages"),
        ('{"moba_fwd:128": [64, 64, 4, 2, 0, 1]}', "no warp-specialised"),
        ('{"engine_fwd:128": [64, 64, 4, 2, 1, 1]}', "tma must be off"),
    ],
)
def test_bad_environment_names_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("SPARSE_ATTN_TILES", value)
    with pytest.raises(ValueError, match="SPARSE_ATTN_TILES") as error:
        tiles.lookup("engine_fwd", 128)
    assert message in str(error.value)


def test_bad_override_raises_before_running():
    with pytest.raises(ValueError, match="unknown kernel"):
        with tiles.override("engine_fwdd", 128, Tile(64, 64, 4, 2)):
            pass
    with pytest.raises(ValueError, match="powers of two"):
        with tiles.override("engine_fwd", 128, Tile(64, 64, 3, 2)):
            pass


def test_launch_config_divides_blocks_and_caps_fp32():
    q16 = torch.empty(1, 1, 8, 128, dtype=torch.float16)
    q32 = torch.empty(1, 1, 8, 128, dtype=torch.float32)
    with tiles.override("engine_fwd", 128, Tile(128, 128, 8, 3)):
        config = tiles.launch_config("engine_fwd", q16, 48, 80)
        assert (config["BLOCK_M"], config["BLOCK_N"]) == (16, 16)  # largest powers of two dividing 48 and 80
        assert (config["num_warps"], config["num_stages"], config["DOT_PRECISION"]) == (8, 3, "tf32")
        config = tiles.launch_config("engine_fwd", q32, None, 128)  # gathered rows: no divisibility
        assert (config["BLOCK_M"], config["num_stages"]) == (tiles.FP32_MAX_ROWS, tiles.FP32_MAX_STAGES)
        assert config["DOT_PRECISION"] == "ieee"
    with tiles.override("engine_fwd", 128, Tile(128, 64, 8, 3, tma=True)):
        assert tiles.launch_config("engine_fwd", q16, 128, 128)["USE_TMA"] is True
        assert tiles.launch_config("engine_fwd", q32, 128, 128)["USE_TMA"] is False  # fp32: pointer loads
    assert "USE_TMA" not in tiles.launch_config("moba_dkdv", q16, None, 128)  # no descriptor path there
    with tiles.override("engine_fwd", 128, Tile(128, 64, 4, 3, ws=True)):
        assert tiles.launch_config("engine_fwd", q16, 128, 128)["WARP_SPECIALIZE"] is True
        assert tiles.launch_config("engine_fwd", q32, 128, 128)["WARP_SPECIALIZE"] is False
    assert "WARP_SPECIALIZE" not in tiles.launch_config("moba_dq", q16, None, 128)
    # Past D = 128, fp32 tiles take at most 32 rows: the dK/dV kernel's 64 x 16 needs 168 KB of shared
    # memory at D = 256, over an A100's 163 KB (32 x 16: 98 KB, both measured by the compile check).
    wide = torch.empty(1, 1, 8, 192, dtype=torch.float32)
    config = tiles.launch_config("engine_dkdv", wide, 128, 128)
    assert (config["BLOCK_M"], config["BLOCK_N"]) == (tiles.FP32_WIDE_MAX_ROWS, 16) == (32, 16)


def test_wide_fp32_and_large_blocks_keep_within_shared_memory():
    """Launches the compile check measured over an A100's 163 KB of shared memory a block take another
    tile or the PyTorch path (the interpreter has no such limit, so only the choice is tested here)."""
    from sparse_attn import token_sparse
    from sparse_attn.kernels import block_scores, s2o_attn

    def q_of(dtype, dim):
        return torch.empty(1, 1, 8, dim, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")

    # Block scores: a tile of BLOCK_M + BLOCK_N rows of D (fp32 D = 256, 128 x 128: 256 KB; ProxyAttn's
    # 1024-key blocks sampled 256 rows deep: 320 KB) runs in PyTorch.
    assert block_scores.kernel_supports(q_of(torch.bfloat16, 128), 16, 16)
    assert block_scores.kernel_supports(q_of(torch.bfloat16, 128), 128, 512)
    assert not block_scores.kernel_supports(q_of(torch.bfloat16, 128), 256, 1024)
    assert not block_scores.kernel_supports(q_of(torch.float32, 256), 128, 128)
    assert not block_scores.kernel_supports(q_of(torch.bfloat16, 128), 12, 16)  # not a power of two
    # Token-sparse: fp32 past 256 dims (sparse_mla's 576 / 512 backward needs 208 KB) runs in PyTorch.
    for dim, value_dim, kernel in ((256, 256, True), (576, 512, False), (320, 128, False)):
        q, v = q_of(torch.float32, dim), q_of(torch.float32, value_dim)
        assert (token_sparse._resolve("auto", q, q, v) == "triton") == (kernel and triton_available(q.device))
        if not kernel:
            with pytest.raises(ValueError, match="256 in float32"):
                token_sparse._resolve("triton", q, q, v)
    # S2O's forward: one stage where even 16 keys a step overflow the budget (fp32, 128 rows, D = 256).
    assert s2o_attn._forward_tiles(q_of(torch.float32, 256), 128, 128) == {"SUB_N": 16, "num_stages": 1}
    assert s2o_attn._forward_tiles(q_of(torch.bfloat16, 256), 128, 128)["num_stages"] == 2


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_moba_backward_under_other_row_tiles_raises(rng):
    """MoBA's work items are a multiple of the forward's row tiles; a backward under a taller tile would
    clear its scratch past the item (and past the buffer): refused, naming the cause."""
    from sparse_attn.methods.moba import moba_attn

    q, k, v = (torch.randn(1, 2, 40, 32, generator=rng).to(DEVICE).requires_grad_() for _ in "qkv")
    with tiles.override("moba_fwd", 64, Tile(16, 16, 4, 1)), tiles.override("moba_dq", 64, Tile(16, 16, 4, 1)):
        out = moba_attn(q, k, v, block_size=16, topk=2, backend="triton")  # 48-row items
    with pytest.raises(ValueError, match="changed between the forward and the backward"):
        out.sum().backward()


def test_ws_tiles_split_into_two_64_row_consumers():
    """Each ws tile is one the kernels take (4 warps, no tma) whose split axis (keys in dK/dV, else
    queries) holds two 64-row halves: with fewer, triton 3.6 gives both consumers the whole tile."""
    for kernel, by_bound in tiles.WS_TILES.items():
        assert kernel in tiles.WS_KERNELS and set(by_bound) <= set(tiles.HEAD_DIM_BOUNDS)
        for tile in by_bound.values():
            assert tile.ws and not tile.tma and tile.num_warps == 4
            assert (tile.block_n if kernel == "engine_dkdv" else tile.block_m) == 128


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_override_reaches_the_launch_and_stays_exact(monkeypatch, rng):
    """A non-default tile reaches the kernel launch, and the result still meets FlashAttention's rule."""
    launches = []

    class RecordingLauncher:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"]))
                return launch.launcher(self.kernel)[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(_engine_ops, "launcher", RecordingLauncher)
    q = torch.randn(1, 2, 96, 32, generator=rng).to(DEVICE, torch.float16)
    k, v = (torch.randn(1, 1, 96, 32, generator=rng).to(DEVICE, torch.float16) for _ in range(2))
    layout = random_block_layout(1, 2, 96, 96, 32, 32, 0.6, seed=3, device=DEVICE)
    with tiles.override("engine_fwd", 64, Tile(16, 32, 2, 1)):
        out = block_sparse_attn(q, k, v, layout)
    assert launches == [("_block_sparse_rows_kernel", 16, 32, 2)]
    ref, _ = block_sparse_attention_reference(q, k, v, layout)
    same, _ = block_sparse_attention_reference(q, k, v, layout, compute_dtype=torch.float16)
    assert_flash_rule(out, ref, same, 2, "output")


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_tune_quick_sweeps_every_kernel_and_picks_a_matching_tile(monkeypatch):
    rows = list(tune.run(tune.QUICK, torch.device("cpu")))
    kernels = {row["kernel"] for row in rows}
    assert kernels == set(tune.SWEEPS)
    for kernel in kernels:
        mine = [row for row in rows if row["kernel"] == kernel]
        assert sum(row.get("pick") == "best" for row in mine) == 1
        assert any(row["default"] for row in mine)
        for row in mine:
            assert row["ok"], row
            assert row["ms"] > 0 and row["rel_diff_vs_default"] <= tune.QUICK["match_tolerance"]
    # More than the default was tried: the warp-specialised candidate first (it runs under the
    # interpreter too), then BLOCK_M 16 and tma, which fold into no other tile at these block sizes.
    assert [row["tile_text"] for row in rows if row["kernel"] == "engine_fwd"] == [
        "32x32 w4 s3",
        "16x32 w4 s1 ws",
        "16x32 w4 s3",
        "32x32 w4 s3 tma",
    ]
    assert "16x32 w4 s1 ws" in [row["tile_text"] for row in rows if row["kernel"] == "engine_dkdv"]
    assert not any(row["tile"][4] for row in rows if row["kernel"] not in tiles.TMA_KERNELS and "tile" in row)
    assert not any(row["tile"][5] for row in rows if row["kernel"] not in tiles.WS_KERNELS and "tile" in row)
    setting = tune.best_tiles_setting(rows)
    monkeypatch.setenv("SPARSE_ATTN_TILES", setting)  # the printed value is a valid setting
    for key, tile in json.loads(setting).items():
        kernel, bound = key.split(":")
        assert tiles.lookup(kernel, int(bound)) == Tile(*tile)


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_tune_time_budget_keeps_the_defaults(capsys):
    """With its budget spent the sweep still times each kernel's default and says what it left."""
    kernels = ("engine_fwd", "moba_schedule")
    rows = list(tune.run({**tune.QUICK, "kernels": kernels, "seconds": 0}, torch.device("cpu")))
    assert [(row["kernel"], row["default"]) for row in rows] == [(kernel, True) for kernel in kernels]
    assert "engine_fwd: time budget spent, untimed: 16x32 w4 s1 ws" in capsys.readouterr().out


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_tune_named_kernels_only_with_candidates_and_the_setting_for_later_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tune.json"
    assert main(["tune", "--quick", "--kernels", "engine_dq", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {row["kernel"] for row in rows} == {"engine_dq"}
    # The config's candidate (two fields from the default) was timed besides the single changes.
    assert "16x32 w4 s1 tma" in [row["tile_text"] for row in rows]
    picked = json.loads(tune.best_tiles_setting(rows))
    assert list(picked) == ["engine_dq:64"]
    # What gpu_check.sh exports after a sweep: the environment's tiles, the winners over them.
    before = {"engine_fwd:64": [16, 32, 4, 1], "engine_dq:64": [32, 32, 2, 1]}
    monkeypatch.setenv("SPARSE_ATTN_TILES", json.dumps(before))
    merged = json.loads(tune.setting_after_sweep(str(out)))
    assert merged == {"engine_fwd:64": [16, 32, 4, 1], **picked}
    printed = subprocess.run(
        [sys.executable, "-m", "sparse_attn.bench.tune", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(printed) == merged
    with pytest.raises(ValueError, match="kernels must name"):
        list(tune.run({**tune.QUICK, "kernels": ("engine_bwd",)}, torch.device("cpu")))


def test_a_tile_must_beat_the_default_by_the_margin():
    for candidate_ms, picked in ((10.0 / (1 + tune.MIN_GAIN / 2), "default"), (9.0, "candidate")):
        rows = [
            {"name": "default", "default": True, "ok": True, "ms": 10.0},
            {"name": "candidate", "default": False, "ok": True, "ms": candidate_ms},
            {"name": "wrong", "default": False, "ok": False, "ms": 1.0},  # fast but off the reference
        ]
        tune._mark_speedups(rows)
        assert [row["name"] for row in rows if row.get("pick")] == [picked]
