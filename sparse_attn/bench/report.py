"""The benchmark report: markdown tables, DIR/report.md and the plots, from the suites' JSON files.

`python -m sparse_attn.bench report DIR` re-renders them from DIR/<suite>.json alone, so a GPU run's
JSON can be rendered on any machine. The plots need matplotlib (the `bench` extra); without it the
markdown is still written and one line says the plots were skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .suites import SUITES

FLAG = "**OUT OF BOUNDS**"
SPEEDUP_PNG = "speedup.png"
PARETO_PNG = "pareto.png"
ENVIRONMENT = [
    ("date", "date"),
    ("device", "device"),
    ("driver", "driver"),
    ("torch", "torch"),
    ("triton", "triton"),
    ("CUDA", "cuda"),
]


# ---------------------------------------------------------------------------------- tables
def format_cell(value, fmt: str) -> str:
    """One table cell; the `flag` format turns error_ok into ok or the out-of-bounds flag."""
    if fmt == "flag":
        return "-" if value is None else ("ok" if value else FLAG)
    if value is None or isinstance(value, str):
        return "-" if value is None else value
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return format(value, fmt)


def _check_cell(row: dict) -> str:
    cell = format_cell(row.get("error_ok"), "flag")
    flags = row.get("error_flags")
    return f"{cell} ({', '.join(flags)})" if flags and not row.get("error_ok") else cell


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (header, key, format). A row out of bounds says so in its check column."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_check_cell(row) if fmt == "flag" else format_cell(row.get(key), fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peer_failures(rows: list[dict]) -> list[str]:
    """The distinct `name`_error strings the guarded peers recorded."""
    seen = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("_error") and isinstance(value, str):
                seen.setdefault(f"{key[: -len('_error')]}: {value}", None)
    return list(seen)


# ---------------------------------------------------------------------------------- report.md
def load_results(directory) -> dict[str, dict]:
    """DIR/<suite>.json for every suite present, in the suites' order."""
    directory = Path(directory)
    return {
        name: json.loads((directory / f"{name}.json").read_text())
        for name in SUITES
        if (directory / f"{name}.json").is_file()
    }


def environment_table(payloads: dict[str, dict]) -> str:
    """One line per suite: mode, date, device, driver and versions (runs may be mixed in one directory)."""
    header = ["suite", "mode", *(title for title, _ in ENVIRONMENT), "Triton mode"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, payload in payloads.items():
        env = payload.get("environment", {})
        cells = [name, payload.get("mode", "-"), *(str(env.get(key) or "-") for _, key in ENVIRONMENT)]
        cells.append(str(env.get("backends", {}).get("triton mode") or "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def error_summary(payloads: dict[str, dict]) -> str:
    """A line at the top: how many rows passed their error checks, and which did not."""
    failed, total = [], 0
    for name, payload in payloads.items():
        if payload.get("error"):
            failed.append(f"{name} (suite failed)")
        for index, row in enumerate(payload.get("results", [])):
            total += 1
            if not row.get("error_ok"):
                failed.append(f"{name} row {index + 1}")
    if not failed:
        return f"Error checks: all {total} rows within their bounds."
    return f"Error checks: {FLAG}: {len(failed)} of {total} rows or suites: " + ", ".join(failed) + "."


def suite_section(name: str, payload: dict) -> str:
    suite = SUITES[name]
    config = payload.get("config", {})
    shapes = ", ".join(f"{key}={value}" for key, value in config.items() if key != "error_rule")
    parts = [
        f"## {name} ({payload.get('mode', '?')})",
        f"Config: {shapes}.",
        f"Speedup: {suite.SPEEDUP}. Error bounds: {config.get('error_rule', '-')}.",
    ]
    if payload.get("error"):
        parts.append(f"{FLAG}: the suite failed: `{payload['error']}`")
    elif payload.get("complete") is False:  # files from before the field have none
        parts.append(f"{FLAG}: the run was cut off: these are the rows it finished")
    parts.append(markdown_table(payload.get("results", []), suite.COLUMNS))
    failures = peer_failures(payload.get("results", []))
    if failures:
        parts.append("Peers that failed (recorded, the run went on):\n" + "\n".join(f"- `{f}`" for f in failures))
    return "\n\n".join(parts)


def render_markdown(payloads: dict[str, dict], plots: list[str]) -> str:
    parts = ["# Benchmark report", environment_table(payloads), error_summary(payloads)]
    titles = {SPEEDUP_PNG: "speedup over the fastest dense peer", PARETO_PNG: "error against dense vs density"}
    parts += [f"![{titles[plot]}]({plot})" for plot in plots]
    parts += [suite_section(name, payload) for name, payload in payloads.items()]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    return plt


def _title(payloads: dict[str, dict]) -> str:
    env = next(iter(payloads.values())).get("environment", {})
    modes = sorted({payload.get("mode", "?") for payload in payloads.values()})
    return f"{env.get('device', '?')}, {'/'.join(modes)}, {env.get('date', '?')}"


def plot_speedup(plt, payloads: dict[str, dict], path: Path) -> None:
    """One panel per suite: speedup over the fastest dense peer against sequence length, a line per row family."""
    fig, axes = plt.subplots(1, len(payloads), figsize=(5 * len(payloads), 4), squeeze=False)
    for ax, (name, payload) in zip(axes[0], payloads.items()):
        suite = SUITES[name]
        lines: dict[str, list] = {}
        for row in payload.get("results", []):
            if row.get("speedup_over_best_dense"):
                lines.setdefault(suite.family(row), []).append((row[suite.SEQ_KEY], row["speedup_over_best_dense"]))
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length" if suite.SEQ_KEY == "seq_len" else "KV cache length")
        ax.set_ylabel("speedup over the fastest dense peer")
        ax.set_title(name)
        if lines:
            ax.legend(fontsize=7)
    fig.suptitle(_title(payloads))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both density and error, by increasing density."""
    front, best = [], math.inf
    for density, error in sorted(points):
        if error < best:
            front.append((density, error))
            best = error
    return front


def plot_pareto(plt, payloads: dict[str, dict], path: Path) -> None:
    """Relative error against dense over density, a series per (method, length), its Pareto front drawn;
    rows out of bounds are crossed out in red. Only rows measured against dense attention appear."""
    fig, ax = plt.subplots(figsize=(7, 5))
    floor = 1e-12  # a lossless fp64-exact row would otherwise vanish from the log axis
    series: dict[str, list] = {}
    failed = []
    for name, payload in payloads.items():
        for row in payload.get("results", []):
            if row.get("error_reference") != "dense" or row.get("output_rel_error") is None:
                continue
            point = (row["density"], max(row["output_rel_error"], floor))
            series.setdefault(f"{name} S={row.get('seq_len')}", []).append(point)
            if not row.get("error_ok"):
                failed.append(point)
    for label, points in series.items():
        scatter = ax.scatter(*zip(*points), s=18, label=label)
        ax.plot(*zip(*_pareto_front(points)), color=scatter.get_facecolor()[0], linewidth=1)
    if failed:
        ax.scatter(*zip(*failed), marker="x", s=80, color="red", label="out of bounds")
    ax.set_yscale("log")
    ax.set_xlabel("density (share of the causal blocks / pairs computed)")
    ax.set_ylabel("relative output error vs dense (fp64)")
    ax.set_title(_title(payloads), fontsize=9)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(payloads: dict[str, dict], directory: Path) -> list[str]:
    """The PNGs written into directory, or none (with a note) when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        print("matplotlib is not installed: plots skipped (pip install matplotlib, or the `bench` extra)")
        return []
    plot_speedup(plt, payloads, directory / SPEEDUP_PNG)
    plot_pareto(plt, payloads, directory / PARETO_PNG)
    return [SPEEDUP_PNG, PARETO_PNG]


def render(directory) -> str:
    """Writes DIR/report.md and the plots from DIR/<suite>.json; returns the markdown."""
    directory = Path(directory)
    payloads = load_results(directory)
    if not payloads:
        raise FileNotFoundError(f"no suite results (<suite>.json for {', '.join(SUITES)}) in {directory}")
    markdown = render_markdown(payloads, write_plots(payloads, directory))
    (directory / "report.md").write_text(markdown)
    print(f"wrote {directory / 'report.md'}")
    return markdown
