"""Matched-run report: loss against tokens, data order, milestones, throughput and cost, recall, state.

    python tools/report.py runs/based_360m_10b runs/attn_360m_10b runs/mamba_360m_10b --out reports/360m
    make report RUNS="runs/based_360m_10b runs/attn_360m_10b" [REPORT_OUT=reports/latest]

Writes OUT/report.md with OUT/loss_vs_tokens.png and OUT/state_vs_recall.png. A run folder may be a trainer
run (finished, stopped early, or still going: it is marked running with the time left at the logged
throughput), a tools/import_hf.py run or a tools/export_hf.py folder. Recall results are read from RUN/eval/
(`tools/lm_eval_model.py ... --output_path RUN/eval`, `tools/mqar.py ... --out RUN/eval/mqar-PRESET.json`);
the published table (tools/data/published_recall.json) is shown beside them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.report_figures import TASK_NAMES, format_tokens, loss_figure, state_recall_figure  # noqa: E402
from tools.run_reader import (  # noqa: E402
    RECALL_TASKS,
    RunFolderError,
    RunInfo,
    describe_status,
    format_duration,
    read_run,
    size_label,
)

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = Path(__file__).resolve().parent / "data" / "published_recall.json"
SIZE_TOLERANCE = 1.3  # a run matches a published row when parameters agree within this factor
TOKEN_TOLERANCE = 1.25
PUBLISHED_ARCH = {"based": "Based", "attn": "Attention", "mamba": "Mamba"}  # the README's names


def milestones(reach: list[int], first: int, count: int = 8) -> list[int]:
    """Token counts to compare runs at: the 1-2-5 series (1B, 2B, 5B, 10B, ...) from `first` (the first
    validation) up to the longest run's `reach` (its planned tokens), the largest `count` of them; where fewer
    than 3 fit: quarters of the shortest run from `first` on."""
    if not reach or max(reach) <= 0:
        return []
    top = max(reach)
    series = []
    exponent = max(0, int(math.floor(math.log10(max(first, 1)))))
    while 10**exponent <= top:
        series += [m * 10**exponent for m in (1, 2, 5) if first <= m * 10**exponent <= top]
        exponent += 1
    if len(series) >= 3:
        return series[-count:]
    shortest = min(r for r in reach if r > 0)
    return [q for q in (shortest // 4, shortest // 2, 3 * shortest // 4, shortest) if q >= first]


def value_at(tokens: list[int], values: list[float], at: int) -> float | None:
    """The curve's value at `at` tokens, linear between the two logged points around it; None outside."""
    for i, t in enumerate(tokens):
        if t == at:
            return values[i]
        if t > at:
            if i == 0:
                return None
            t0, v0 = tokens[i - 1], values[i - 1]
            return v0 + (values[i] - v0) * (at - t0) / (t - t0)
    return None


def load_published(path: Path = PUBLISHED) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def merge_published(ours: list[dict], published: list[dict]) -> list[dict]:
    """Rows of the comparison table: each published row with every run of ours that matches it.

    ours: {name, family, params, tokens (None when unknown, e.g. imported), recall {task: %}}. A run
    matches a published row with its family, parameters within SIZE_TOLERANCE and (when both are known)
    tokens within TOKEN_TOLERANCE. Each row: {published, ours (or None), diff {task: ours - published}}.
    """
    rows = []
    for pub in published:
        matched = [run for run in ours if _matches(run, pub)]
        for run in matched or [None]:
            diff = {}
            for task in RECALL_TASKS:
                mine = run["recall"].get(task) if run else None
                if mine is not None and pub.get(task) is not None:
                    diff[task] = mine - pub[task]
            rows.append({"published": pub, "ours": run, "diff": diff})
    return rows


def _matches(run: dict, pub: dict) -> bool:
    if run["family"] != pub["family"] or not run["params"]:
        return False
    if max(run["params"], pub["params"]) / min(run["params"], pub["params"]) > SIZE_TOLERANCE:
        return False
    if run.get("tokens") and pub.get("tokens"):
        return max(run["tokens"], pub["tokens"]) / min(run["tokens"], pub["tokens"]) <= TOKEN_TOLERANCE
    return True


def published_state_bytes(published: list[dict]) -> dict[str, int]:
    """Recurrent state per sequence of each published model, from our config of it (pretrain.describe)."""
    return {
        pub["config"]: state for pub in published if (state := _config_state_bytes(pub["config"])) is not None
    }


@functools.cache
def _config_state_bytes(name: str) -> int | None:
    from pretrain.config import load_config
    from tools.run_reader import model_facts

    config = ROOT / "configs" / f"{name}.yaml"
    return model_facts(load_config(config))[1] if config.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    if value is None:
        return "–"
    return "non-finite" if not math.isfinite(value) else fmt.format(value)


def _last_finite(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else None


def runs_section(runs: list[RunInfo]) -> list[str]:
    rows = []
    for r in runs:
        total = format_tokens(r.total_tokens) if r.total_tokens else "–"
        steps = f"{r.last_step:,} / {r.max_steps:,}" if r.max_steps else "–"
        rows.append(
            [
                f"`{r.name}`",
                r.arch,
                size_label(r.params),
                f"`{r.path}`",
                describe_status(r),
                steps,
                f"{format_tokens(r.tokens_seen)} / {total}" if r.max_steps else "–",
                _num(_last_finite(r.train.values)),
                _num(_last_finite(r.val.values)),
            ]
        )
    header = [
        "run",
        "architecture",
        "parameters",
        "folder",
        "status",
        "steps",
        "tokens seen",
        "last train loss",
        "last val loss",
    ]
    return ["## Runs", "", *_table(header, rows), ""]


def compare_data(runs: list[RunInfo]) -> list[str]:
    """Sentences: same data and order for every trainer run, or which runs differ from the first and how."""
    trainer = [r for r in runs if r.kind == "trainer"]
    lines = [
        f"- `{r.name}`: {r.data.problem}" + (f" ({r.imported_from})" if r.imported_from else "")
        for r in runs
        if r.kind != "trainer"
    ]
    if not trainer:
        return lines
    ref, differ = trainer[0], []
    for r in trainer[1:]:
        problems = _data_differences(ref, r)
        if problems:
            differ.append(f"- **`{r.name}` differs from `{ref.name}`**: " + "; ".join(problems))
    unknown = [r for r in trainer if r.data.fingerprint is None]
    if len(trainer) > 1 and not differ:
        basis = (
            f"manifest fingerprint `{ref.data.fingerprint[:16]}`"
            if not unknown
            else "data.path only: a manifest could not be read"
        )
        lines.insert(
            0,
            f"- All {len(trainer)} trainer runs read the same data ({basis}) in the same order "
            f"(data.seed {ref.data.seed}, {ref.data.global_batch} x {ref.data.seq_len} tokens per step): "
            "step s of every run saw the same tokens; a shorter run's tokens are a prefix of a longer one's.",
        )
    lines[:0] = differ
    lines += [f"- `{r.name}`: {r.data.problem}" for r in unknown if r.data.problem]
    return lines


def _data_differences(ref: RunInfo, run: RunInfo) -> list[str]:
    a, b = ref.data, run.data
    out = []
    if a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint:
        out.append(
            f"different data (manifest fingerprint `{b.fingerprint[:16]}` vs `{a.fingerprint[:16]}`; "
            f"data.path `{b.path}` vs `{a.path}`)"
        )
    elif not (a.fingerprint and b.fingerprint) and a.path != b.path:
        out.append(f"different data.path (`{b.path}` vs `{a.path}`; a manifest could not be read to compare)")
    if a.tokenizer and b.tokenizer and a.tokenizer != b.tokenizer:
        out.append(f"different tokenizer ({b.tokenizer} vs {a.tokenizer}): losses are not comparable")
    if a.seq_len != b.seq_len:
        out.append(f"different seq_len ({b.seq_len} vs {a.seq_len})")
    if a.seed != b.seed:
        out.append(f"different order (data.seed {b.seed} vs {a.seed})")
    elif a.global_batch != b.global_batch:
        out.append(
            f"same sample order but {b.global_batch} vs {a.global_batch} sequences per step: steps do not "
            "align, tokens seen do"
        )
    if a.doc_reset != b.doc_reset:
        out.append(f"data.reset_state_at_doc_boundaries {b.doc_reset} vs {a.doc_reset}")
    return out


def data_section(runs: list[RunInfo]) -> list[str]:
    rows = [
        [
            f"`{r.name}`",
            f"`{r.data.path}`" if r.data.path else "–",
            f"`{r.data.fingerprint[:16]}`" if r.data.fingerprint else "–",
            r.data.tokenizer or "–",
            _num(r.data.seed, "{}"),
            _num(r.data.seq_len, "{}"),
            _num(r.data.global_batch, "{}"),
        ]
        for r in runs
    ]
    header = [
        "run",
        "data.path",
        "manifest fingerprint",
        "tokenizer",
        "data.seed",
        "seq_len",
        "sequences/step",
    ]
    return ["## Data", "", *compare_data(runs), "", *_table(header, rows), ""]


def milestone_section(runs: list[RunInfo]) -> list[str]:
    with_val = [r for r in runs if any(math.isfinite(v) for v in r.val.values)]
    if not with_val:
        return ["## Validation loss at token milestones", "", "No run has validation losses yet.", ""]
    # a live or stopped run is compared at the milestones of its planned length, the unreached ones empty
    marks = milestones(
        [r.total_tokens or r.val.tokens[-1] for r in with_val], min(r.val.tokens[0] for r in with_val)
    )
    rows = []
    for r in with_val:
        cells = []
        for m in marks:
            v = value_at(r.val.tokens, r.val.values, m)
            cells.append(
                "–" if v is None else f"{_num(v)} ({_num(math.exp(v) if math.isfinite(v) else v, '{:.2f}')})"
            )
        rows.append([f"`{r.name}`", r.arch, size_label(r.params), *cells])
    header = ["run", "architecture", "parameters", *[format_tokens(m) for m in marks]]
    note = (
        "Validation loss in nats per token (perplexity in brackets) at each number of tokens seen; between two "
        "validations the value is interpolated linearly in tokens; – = not reached (or before the first "
        "validation). Perplexities compare only between runs with the same tokenizer."
    )
    return ["## Validation loss at token milestones", "", note, "", *_table(header, rows), ""]


def throughput_section(runs: list[RunInfo]) -> list[str]:
    rows = []
    for r in runs:
        t = r.throughput
        if r.kind != "trainer":
            continue
        wall = format_duration(t.wall_s) + (" (est.)" if t.wall_is_estimate and t.wall_s else "")
        rows.append(
            [
                f"`{r.name}`",
                _num(t.gpus, "{}"),
                _num(t.tokens_per_s, "{:,.0f}"),
                _num(t.tokens_per_s_per_gpu, "{:,.0f}"),
                _num(t.mfu * 100 if t.mfu else None, "{:.1f}%"),
                wall,
                _num(t.gpu_hours, "{:,.2f}"),
                _num(t.sessions or None, "{}"),
                format_duration(r.eta_s) if r.status == "running" else "–",
            ]
        )
    header = [
        "run",
        "GPUs",
        "tokens/s",
        "tokens/s/GPU",
        "MFU",
        "wall time",
        "GPU-hours",
        "sessions",
        "time left",
    ]
    note = (
        "Medians over the logged steps. Wall time adds up each training session (`time/elapsed_s` of "
        "metrics.jsonl, from trainer start to the last row; a resume starts a session); (est.) = older "
        "metrics without it: the logged step times times the steps between rows (no validation or "
        "checkpoint time). Time left = remaining tokens at the median of the last 5 logged rows' tokens/s."
    )
    return ["## Throughput and cost", "", note, "", *_table(header, rows), ""] if rows else []


def recall_section(runs: list[RunInfo], published: list[dict]) -> list[str]:
    names = [TASK_NAMES[t] for t in RECALL_TASKS]
    ours = [r for r in runs if r.recall]
    lines = ["## Recall", ""]
    if ours:
        rows = [
            [
                r.arch,
                size_label(r.params),
                f"`{r.name}`",
                *[_num(r.recall.get(t), "{:.2f}") for t in RECALL_TASKS],
            ]
            for r in ours
        ]
        lines += [
            "Accuracy (%) as lm-eval's `contains` (0-shot), read from RUN/eval/.",
            "",
            *_table(["architecture", "size", "run", *names], rows),
            "",
        ]
    else:
        lines += [
            "No recall results in the run folders (RUN/eval/: `tools/lm_eval_model.py --output_path RUN/eval`).",
            "",
        ]
    merged = merge_published([_recall_key(r) for r in runs if r.recall], published)
    rows = []
    for m in merged:
        pub, run = m["published"], m["ours"]
        cells = []
        for t in RECALL_TASKS:
            mine = run["recall"].get(t) if run else None
            diff = f" ({m['diff'][t]:+.2f})" if t in m["diff"] else ""
            cells.append(f"{_num(mine, '{:.2f}')} / {pub[t]:.2f}{diff}")
        rows.append([PUBLISHED_ARCH[pub["family"]], pub["size"], f"`{run['name']}`" if run else "–", *cells])
    src = json.loads(PUBLISHED.read_text())["source"]
    lines += [
        f"Published numbers beside ours: ours / published (ours − published), from {src['repository']}@"
        f"{src['commit']}:{src['path']} (`tools/data/published_recall.json`).",
        "",
        *_table(["architecture", "size", "our run", *names], rows),
        "",
    ]
    return lines + _mqar_lines(runs)


def _recall_key(run: RunInfo) -> dict:
    tokens = run.total_tokens if run.status == "finished" else (run.tokens_seen or None)
    return {
        "name": run.name,
        "family": run.family,
        "params": run.params,
        "tokens": None if run.kind != "trainer" else tokens,
        "recall": run.recall,
    }


def _mqar_lines(runs: list[RunInfo]) -> list[str]:
    rows = [
        [
            f"`{r.name}`",
            m["preset"],
            _num(m["best_lr"], "{:g}"),
            f"{m['accuracy']:.4f}",
            ", ".join(f"{k} {v:.3f}" for k, v in m["segments"].items()),
        ]
        for r in runs
        for m in r.mqar
    ]
    if not rows:
        return []
    return [
        "MQAR (tools/mqar.py, synthetic associative recall on the paper's two-layer models):",
        "",
        *_table(["run folder", "preset", "best lr", "mean accuracy", "per segment"], rows),
        "",
    ]


def state_points(runs: list[RunInfo], published: list[dict]) -> list[dict]:
    points = []
    for r in runs:
        for task, acc in r.recall.items():
            points.append(
                {
                    "label": r.name,
                    "family": r.family,
                    "state_bytes": r.state_bytes,
                    "task": task,
                    "accuracy": acc,
                    "published": False,
                }
            )
    states = published_state_bytes(published)
    for pub in published:
        if pub["config"] in states:
            for task in RECALL_TASKS:
                points.append(
                    {
                        "label": f"{PUBLISHED_ARCH[pub['family']]} {pub['size']} (published)",
                        "family": pub["family"],
                        "state_bytes": states[pub["config"]],
                        "task": task,
                        "accuracy": pub[task],
                        "published": True,
                    }
                )
    return points


def state_section(runs: list[RunInfo], figure: str) -> list[str]:
    rows = [
        [
            f"`{r.name}`",
            r.arch,
            size_label(r.params),
            f"{r.state_bytes:,}" if r.state_bytes else "–",
            _num(sum(r.recall.values()) / len(r.recall) if r.recall else None, "{:.2f}"),
        ]
        for r in runs
    ]
    note = (
        "Recurrent state per sequence at inference as `pretrain.describe` counts it (linear-attention and SSM "
        "state fp32, conv tails and window bf16; attention: its KV cache at the training length). The figure "
        "puts the published models at the state of our config of them."
    )
    return [
        "## Recurrent state and recall",
        "",
        note,
        "",
        *_table(["run", "architecture", "parameters", "state bytes/sequence", "mean recall (%)"], rows),
        "",
        f"![recall against state size]({figure})",
        "",
    ]


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(runs: list[RunInfo], out: Path, published: list[dict] | None = None) -> Path:
    """OUT/report.md and its figures; returns the report's path."""
    published = load_published() if published is None else published
    out.mkdir(parents=True, exist_ok=True)
    loss_figure(runs, out / "loss_vs_tokens.png")
    state_recall_figure(state_points(runs, published), out / "state_vs_recall.png")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Run report",
        "",
        f"{when}, git {_git_revision()}, `python tools/report.py "
        + " ".join(str(r.path) for r in runs)
        + f" --out {out}`",
        "",
    ]
    lines += runs_section(runs) + data_section(runs)
    lines += ["## Loss against tokens seen", "", "![loss against tokens](loss_vs_tokens.png)", ""]
    lines += milestone_section(runs) + throughput_section(runs) + recall_section(runs, published)
    lines += state_section(runs, "state_vs_recall.png")
    warnings = [w for r in runs for w in r.warnings]
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", help="run folders (trainer runs, tools/import_hf.py runs, exports)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md and the figures")
    parser.add_argument(
        "--stale-minutes",
        type=float,
        default=15.0,
        help="a run short of max_steps whose metrics.jsonl is older than this (or 3 row intervals) "
        "counts as stopped, else running",
    )
    args = parser.parse_args(argv)
    try:
        runs = [read_run(p, stale_minimum_s=60 * args.stale_minutes) for p in args.runs]
    except RunFolderError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    path = write_report(runs, args.out)
    print(f"report: {path}")
    for r in runs:
        print(f"  {r.name}: {r.arch} {size_label(r.params)}, {describe_status(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
