"""The report's figures (matplotlib, Agg backend: no display needed).

- loss_vs_tokens.png: training loss (solid) and validation loss (dashed, markers) against tokens seen, one
  colour per run, on one set of axes;
- state_vs_recall.png: recall accuracy against recurrent state bytes per sequence (log x), our runs filled,
  the published models hollow, one marker per task.
"""

from __future__ import annotations

import math
from pathlib import Path

FIGSIZE = (10.0, 6.0)  # inches; at DPI 100 the PNGs are 1000 x 600 pixels
DPI = 100
TASK_MARKERS = {"swde": "o", "fda": "s", "squad_completion": "^"}
TASK_NAMES = {"swde": "SWDE", "fda": "FDA", "squad_completion": "SQuAD-completion"}
FAMILY_COLORS = {"based": "tab:blue", "attn": "tab:orange", "mamba": "tab:green"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit(
            "report: matplotlib is needed for the figures: pip install matplotlib "
            "(or `make setup`, which installs the 'report' extra)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_tokens(value: float, _pos=None) -> str:
    """Axis / table label for a token count: 1.5B, 614k, 512."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            text = f"{value / scale:.2f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{value:.0f}"


def _loss_ylim(runs) -> tuple[float, float] | None:
    """Show the curves' informative range: the start of training (loss ~ ln V) would flatten everything."""
    values = []
    for run in runs:
        train = [v for v in run.train.values if math.isfinite(v)]
        values += train[len(train) // 10 :] + [v for v in run.val.values if math.isfinite(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def loss_figure(runs, path: Path) -> Path:
    """Training and validation loss of every run against tokens seen; returns `path`."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    plotted = [
        run for run in runs if run.train.tokens or run.val.tokens
    ]  # imports and exports have no curves
    for i, run in enumerate(plotted):
        color = colors[i % len(colors)]
        label = f"{run.arch} {_size(run)} · {run.name}" + (" (running)" if run.status == "running" else "")
        if run.train.tokens:
            ax.plot(run.train.tokens, run.train.values, color=color, linewidth=1.2, alpha=0.85)
        if run.val.tokens:
            ax.plot(run.val.tokens, run.val.values, color=color, linestyle="--", marker="o", markersize=4)
        handles.append(Line2D([], [], color=color, linewidth=2, label=label))
    handles += [
        Line2D([], [], color="gray", linewidth=1.2, label="training loss"),
        Line2D([], [], color="gray", linestyle="--", marker="o", markersize=4, label="validation loss"),
    ]
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    limits = _loss_ylim(runs)
    if limits:
        ax.set_ylim(*limits)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title("Loss against tokens seen")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _size(run) -> str:
    from tools.run_reader import size_label

    return size_label(run.params)


def state_recall_figure(points: list[dict], path: Path) -> Path:
    """points: {label, family, state_bytes, task, accuracy, published: bool}; returns `path`."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for p in points:
        color = FAMILY_COLORS.get(p["family"], "tab:gray")
        face = "none" if p["published"] else color
        ax.scatter(
            p["state_bytes"],
            p["accuracy"],
            marker=TASK_MARKERS[p["task"]],
            s=60,
            edgecolors=color,
            facecolors=face,
            linewidths=1.5,
            zorder=3,
        )
    _label_models(ax, points)
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the rightmost label
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: _bytes(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
    ax.set_xlabel(
        "recurrent state per sequence at inference (log scale; attention: KV cache at the training length)"
    )
    ax.set_ylabel("recall accuracy (%)")
    ax.set_title("Recall against recurrent state size")
    ax.grid(True, alpha=0.3, which="both")
    families = sorted({p["family"] for p in points})
    tasks = [t for t in TASK_MARKERS if any(p["task"] == t for p in points)]
    handles = [
        Line2D([], [], color=FAMILY_COLORS.get(f, "tab:gray"), marker="o", linestyle="", label=_arch(f))
        for f in families
    ]
    handles += [
        Line2D([], [], color="black", marker=TASK_MARKERS[t], linestyle="", label=TASK_NAMES[t])
        for t in tasks
    ]
    handles += [
        Line2D([], [], color="black", marker="o", linestyle="", label="ours (filled)"),
        Line2D(
            [],
            [],
            color="black",
            marker="o",
            markerfacecolor="none",
            linestyle="",
            label="published (hollow)",
        ),
    ]
    ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _label_models(ax, points: list[dict]) -> None:
    """One label per model beside its highest point; neighbours along x alternate above and below."""
    labelled: dict[tuple[str, int], list[float]] = {}
    for p in points:
        labelled.setdefault((p["label"], p["state_bytes"]), []).append(p["accuracy"])
    for i, ((label, state), accs) in enumerate(sorted(labelled.items(), key=lambda item: item[0][1])):
        # a faint stem ties a model's task markers (and its label) together
        ax.vlines(state, min(accs), max(accs), colors="lightgray", linewidths=1, zorder=1)
        above = i % 2 == 0
        ax.annotate(
            label,
            (state, max(accs) if above else min(accs)),
            textcoords="offset points",
            xytext=(6, 7 if above else -13),
            fontsize=8,
        )


def _arch(family: str) -> str:
    from tools.run_reader import FAMILY_NAMES

    return FAMILY_NAMES.get(family, family)


def _bytes(value: float) -> str:
    """Decimal units, so that the log axis's ticks at powers of ten read 10 MB, 100 MB, 1 GB."""
    for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f} B"
