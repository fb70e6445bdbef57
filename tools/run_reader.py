"""Read what a run folder holds, for tools/report.py: metrics, config, data identity, evaluations, state.

Folders read:
- a trainer run (`config.yaml`, `metrics.jsonl`, `checkpoints/step_*/meta.json`), finished, stopped or live;
- a run made by tools/import_hf.py (`config.yaml` + a step-0 checkpoint whose train_state names the source);
- a tools/export_hf.py folder (`config.json` with `based_model`).
Evaluation results are read from `RUN/eval/**.json`: lm-eval output (`--output_path RUN/eval`) and
tools/mqar.py output (`--out RUN/eval/mqar-....json`).

metrics.jsonl is read leniently where the trainer's own history allows: bare NaN/Infinity (older files) and
null (non-finite values in strict JSON) both mean "not finite"; a row that goes back to a step already
logged (a resume from an earlier checkpoint) supersedes every row from that step on; a truncated last line
(a live run mid-write) is skipped. A malformed line elsewhere is an error naming file and line.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

# the value that makes a row a training row or a validation row; a second one at a step means it was redone
ROW_KINDS = ("train/loss", "val/loss")
ROOT = Path(__file__).resolve().parents[1]
RECALL_TASKS = ("swde", "fda", "squad_completion")
FAMILY_NAMES = {"based": "Based", "attn": "Transformer++", "mamba": "Mamba"}


class RunFolderError(ValueError):
    """A folder that cannot be reported on; the message names the folder and what was expected."""


@dataclass
class Curve:
    """(step, tokens seen, value) points in step order; value is NaN where the logged value was not finite."""

    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Throughput:
    """Medians over the logged steps, the GPUs used, wall time and GPU-hours (exact or estimated)."""

    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    gpus: int | None = None
    recent_tokens_per_s: float | None = None
    wall_s: float | None = None
    gpu_hours: float | None = None
    wall_is_estimate: bool = False
    sessions: int = 0


@dataclass
class DataIdentity:
    """What decides the tokens a run saw and their order."""

    path: str | None = None
    fingerprint: str | None = None
    seed: int | None = None
    seq_len: int | None = None
    global_batch: int | None = None
    tokenizer: str | None = None
    doc_reset: bool | None = None
    problem: str | None = None  # why the manifest could not be read


@dataclass
class RunInfo:
    path: Path
    kind: str  # "trainer", "imported" or "export"
    name: str
    family: str
    params: int | None
    state_bytes: int | None
    seq_len: int | None
    max_steps: int | None = None
    tokens_per_step: int | None = None
    train: Curve = field(default_factory=Curve)
    val: Curve = field(default_factory=Curve)
    status: str = "no metrics"  # finished, running, stopped, no metrics
    last_step: int = 0
    tokens_seen: int = 0
    eta_s: float | None = None
    throughput: Throughput = field(default_factory=Throughput)
    data: DataIdentity = field(default_factory=DataIdentity)
    recall: dict[str, float] = field(default_factory=dict)  # task -> accuracy in percent
    recall_source: dict[str, str] = field(default_factory=dict)
    mqar: list[dict] = field(default_factory=list)
    imported_from: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return FAMILY_NAMES.get(self.family, self.family)

    @property
    def total_tokens(self) -> int | None:
        if self.max_steps is None or self.tokens_per_step is None:
            return None
        return self.max_steps * self.tokens_per_step


def size_label(params: int | None) -> str:
    """1,349,453,056 -> "1.35B"; 362,620,928 -> "363M"."""
    if not params:
        return "?"
    if params >= 1e9:
        return f"{params / 1e9:.2f}B"
    if params >= 1e6:
        return f"{params / 1e6:.0f}M"
    return f"{params / 1e3:.0f}k"


def _finite_or_nan(value) -> float:
    """JSON value -> float; null, NaN and +-Infinity all become NaN (plots skip it, tables say so)."""
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[str]]:
    """(effective rows in step order after resumes, every parsed row in file order, warnings).

    Effective rows: one merged dict per step (later keys win). A row at a step below the largest so far, or
    a second training (validation) row at a step, starts over from that step: those are the rows a run
    resumed from an earlier checkpoint redid, and everything the old session logged from there is superseded.
    """
    lines = path.read_text(errors="replace").splitlines()
    raw, warnings = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if number == len(lines):
                warnings.append(f"{path}:{number}: incomplete last line skipped (a run writing it?)")
                continue
            raise RunFolderError(
                f"{path}:{number}: not a metrics row ({err}); expected one JSON object per "
                "line as pretrain/metrics.py writes"
            ) from None
        raw.append(row)
    by_step: dict[int, dict] = {}
    for row in raw:
        step = row["step"]
        newest = max(by_step, default=-1)
        kinds = [k for k in ROW_KINDS if k in row]
        redone = step < newest or (step in by_step and any(k in by_step[step] for k in kinds))
        if redone:
            by_step = {s: r for s, r in by_step.items() if s < step}
        by_step.setdefault(step, {"step": step}).update(row)
    return [by_step[s] for s in sorted(by_step)], raw, warnings


def curves(rows: list[dict], tokens_per_step: int | None) -> tuple[Curve, Curve]:
    """Train and val loss against tokens seen (train/tokens_seen where logged, else step x tokens/step)."""
    train, val = Curve(), Curve()
    for row in rows:
        step = row["step"]
        tokens = row.get("train/tokens_seen")
        if not isinstance(tokens, (int, float)) or not math.isfinite(tokens):
            tokens = step * tokens_per_step if tokens_per_step else step
        for key, curve in (("train/loss", train), ("val/loss", val)):
            if key in row:
                curve.steps.append(step)
                curve.tokens.append(int(tokens))
                curve.values.append(_finite_or_nan(row[key]))
    return train, val


def _median(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.median(values) if values else None


def _gpus(row: dict) -> int | None:
    total, per = row.get("perf/tokens_per_s"), row.get("perf/tokens_per_s_per_device")
    if isinstance(total, (int, float)) and isinstance(per, (int, float)) and per > 0 and math.isfinite(total):
        return max(1, round(total / per))
    return None


def sessions_wall(raw: list[dict], tails: bool = False) -> list[tuple[float, int | None]]:
    """[(seconds, GPUs)] per training session: `time/elapsed_s` restarts at 0 when a process starts.

    tails=True for metrics.superseded.jsonl, whose stretches are the ends of sessions cut off at a resume
    (pretrain/metrics.py moves them there): each adds its last minus its first elapsed time.
    """
    out: list[list] = []
    previous = 0.0
    for row in raw:
        elapsed = row.get("time/elapsed_s")
        if not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed):
            continue
        if not out or elapsed < previous:
            out.append([elapsed, elapsed, None])
        out[-1][1] = max(out[-1][1], elapsed)
        out[-1][2] = _gpus(row) or out[-1][2]
        previous = elapsed
    return [(last - first if tails else last, g) for first, last, g in out]


def read_superseded(path: Path) -> list[dict]:
    """Rows of metrics.superseded.jsonl (lines that are not metrics rows were moved there too: skipped)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def throughput(rows: list[dict], raw: list[dict], superseded: list[dict] | None = None) -> Throughput:
    """Medians of the logged perf/ values; wall time from time/elapsed_s (superseded rows' time included:
    it was spent), else estimated from the step times."""
    perf_rows = [r for r in rows if "perf/tokens_per_s" in r]
    result = Throughput(
        tokens_per_s=_median(perf_rows, "perf/tokens_per_s"),
        tokens_per_s_per_gpu=_median(perf_rows, "perf/tokens_per_s_per_device"),
        mfu=_median(perf_rows, "perf/mfu"),
        recent_tokens_per_s=_median(perf_rows[-5:], "perf/tokens_per_s"),
    )
    gpus = [g for g in (_gpus(r) for r in perf_rows) if g]
    result.gpus = max(gpus) if gpus else None
    sessions = sessions_wall(raw)
    if sessions:
        result.sessions = len(sessions)
        sessions += sessions_wall(superseded or [], tails=True)
        result.wall_s = sum(s for s, _ in sessions)
        if all(g for _, g in sessions):
            result.gpu_hours = sum(s * g for s, g in sessions) / 3600
    elif perf_rows:
        # older metrics without time/elapsed_s: each logged step's time stands for the steps since the last row
        result.wall_is_estimate = True
        total, previous = 0.0, 0
        for row in perf_rows:
            step_s = sum(
                float(row.get(k) or 0)
                for k in ("perf/time_data_s", "perf/time_fwd_bwd_s", "perf/time_optim_s")
            )
            total += step_s * (row["step"] - previous)
            previous = row["step"]
        result.wall_s = total
    if result.gpu_hours is None and result.wall_s is not None and result.gpus:
        result.gpu_hours = result.wall_s * result.gpus / 3600
    return result


def run_status(run: RunInfo, metrics_path: Path, now: float, stale_s: float) -> str:
    """finished / running / stopped: a run short of max_steps is live while metrics.jsonl keeps changing."""
    if not run.train.steps and not run.val.steps:
        return "no metrics"
    if run.max_steps is not None and run.last_step >= run.max_steps:
        return "finished"
    age = now - metrics_path.stat().st_mtime
    return "running" if age <= stale_s else "stopped"


def stale_after(rows: list[dict], log_interval: int, minimum_s: float) -> float:
    """Seconds without a new row after which a run counts as stopped: 3 row intervals, at least `minimum_s`."""
    step_s = _median(rows, "perf/time_fwd_bwd_s") or 0.0
    return max(minimum_s, 3 * log_interval * step_s)


def load_run_config(path: Path):
    """(TrainConfig, kind) of a run folder; RunFolderError naming the folder when it is none of the kinds."""
    from pretrain.config import ConfigError, load_config

    if not path.is_dir():
        raise RunFolderError(f"{path}: no such folder (expected a run folder: runs/<run_name>)")
    if (path / "config.yaml").is_file():
        try:
            cfg = load_config(path / "config.yaml")
        except ConfigError as err:
            raise RunFolderError(f"{path}: config.yaml cannot be read: {err}") from None
        return cfg, ("imported" if _imported_from(path) else "trainer")
    if (path / "config.json").is_file():
        return _export_config(path), "export"
    raise RunFolderError(
        f"{path}: not a run folder: no config.yaml (a trainer run or a tools/import_hf.py "
        "run) and no config.json (a tools/export_hf.py export)"
    )


def _export_config(path: Path):
    from omegaconf import OmegaConf

    from pretrain.config import TrainConfig

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path}/config.json: not valid JSON ({err})") from None
    if "based_model" not in config:
        raise RunFolderError(
            f"{path}: config.json has no 'based_model': a published-format checkpoint? Import "
            "it first: python tools/import_hf.py --src DIR --out RUN_DIR, then report on RUN_DIR"
        )
    merged = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {
            "run_name": path.name,
            "model": config["based_model"],
            "data": {"seq_len": int(config.get("max_position_embeddings") or 2048), "path": ""},
        },
    )
    return OmegaConf.to_object(merged)


def _imported_from(path: Path) -> str | None:
    """The source a tools/import_hf.py run was made from (its step-0 train_state says), else None."""
    for state in sorted(path.glob("checkpoints/step_*/train_state.json")):
        try:
            source = json.loads(state.read_text()).get("imported_from")
        except (OSError, json.JSONDecodeError):
            continue
        if source:
            return str(source)
    return None


def data_identity(cfg, kind: str) -> DataIdentity:
    """The data a run names, its manifest fingerprint when the data folder is readable from here."""
    d = cfg.data
    ident = DataIdentity(
        seed=d.seed,
        seq_len=d.seq_len,
        global_batch=d.global_batch_size,
        doc_reset=d.reset_state_at_doc_boundaries,
    )
    if kind != "trainer":
        ident.problem = (
            "trained elsewhere: no data of ours recorded"
            if kind == "imported"
            else "an export: no data recorded"
        )
        ident.seed = ident.global_batch = None
        return ident
    ident.path = d.path
    from data_pipeline.errors import DataError
    from data_pipeline.manifest import load_manifest

    # the trainer resolves a relative data.path against its working directory, normally the repository root
    where = (
        d.path
        if Path(d.path).is_absolute() or (Path(d.path) / "manifest.json").exists()
        else str(ROOT / d.path)
    )
    try:
        manifest = load_manifest(where)
        ident.fingerprint = manifest.fingerprint()
        tok = manifest.tokenizer
        ident.tokenizer = f"{tok.get('name', '?')} ({tok.get('vocab_size', '?')} tokens)"
    except (DataError, OSError, KeyError) as err:
        ident.problem = f"manifest not readable from here: {str(err).splitlines()[0]}"
    return ident


def read_evals(path: Path) -> tuple[dict[str, float], dict[str, str], list[dict], list[str]]:
    """Recall accuracies in percent (task -> value, newest file wins), their files, MQAR results, warnings."""
    recall: dict[str, tuple[float, float, str]] = {}
    mqar, warnings = [], []
    for file in sorted((path / "eval").rglob("*.json")) if (path / "eval").is_dir() else []:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            warnings.append(f"{file}: skipped, not readable JSON ({err})")
            continue
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("results"), dict):
            for task, metrics in data["results"].items():
                value = metrics.get("contains,none") if isinstance(metrics, dict) else None
                if task in RECALL_TASKS and isinstance(value, (int, float)):
                    mtime = file.stat().st_mtime
                    if task not in recall or mtime >= recall[task][1]:
                        recall[task] = (100.0 * value, mtime, str(file))
        elif "preset" in data and "accuracy" in data and "segments" in data:
            mqar.append(
                {
                    "preset": data["preset"],
                    "accuracy": float(data["accuracy"]),
                    "best_lr": data.get("best_lr"),
                    "segments": data["segments"],
                    "file": str(file),
                }
            )
    return ({t: v[0] for t, v in recall.items()}, {t: v[2] for t, v in recall.items()}, mqar, warnings)


def model_facts(cfg) -> tuple[int, int]:
    """(parameters, recurrent state bytes per sequence) from pretrain.describe (meta device: no weights)."""
    from pretrain.describe import describe

    info = describe(cfg)
    return info["params_total"], info["state_bytes_per_sequence"]


def read_run(path: str | Path, now: float | None = None, stale_minimum_s: float = 900.0) -> RunInfo:
    """Everything the report shows about one folder; RunFolderError if it is not a run folder."""
    from pretrain.config import ConfigError, derive

    path = Path(path)
    cfg, kind = load_run_config(path)
    params, state = model_facts(cfg)
    run = RunInfo(
        path=path,
        kind=kind,
        name=cfg.run_name if kind == "trainer" else path.name,
        family=cfg.model.family,
        params=params,
        state_bytes=state,
        seq_len=cfg.data.seq_len,
        imported_from=_imported_from(path) if kind == "imported" else None,
    )
    run.data = data_identity(cfg, kind)
    run.recall, run.recall_source, run.mqar, run.warnings = read_evals(path)
    metrics = path / "metrics.jsonl"
    if kind != "trainer":
        return run
    run.max_steps = cfg.schedule.max_steps
    try:
        run.tokens_per_step = derive(cfg, 1).tokens_per_step
    except ConfigError:
        run.tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    if not metrics.is_file():
        run.warnings.append(f"{path}: no metrics.jsonl yet")
        return run
    rows, raw, warnings = read_metrics(metrics)
    run.warnings += warnings
    run.train, run.val = curves(rows, run.tokens_per_step)
    run.last_step = max(run.train.steps + run.val.steps, default=0)
    run.tokens_seen = max(run.train.tokens + run.val.tokens, default=0)
    run.throughput = throughput(rows, raw, read_superseded(path / "metrics.superseded.jsonl"))
    stale = stale_after(rows, cfg.logging.log_interval, stale_minimum_s)
    run.status = run_status(run, metrics, time.time() if now is None else now, stale)
    recent = run.throughput.recent_tokens_per_s
    if run.status == "running" and recent:
        run.eta_s = (run.total_tokens - run.tokens_seen) / recent
    return run


def describe_status(run: RunInfo) -> str:
    """ "finished", "running, 42% (time left ~3.1 h)", "stopped at step 40 of 300"."""
    if run.status == "running":
        done = f"{100 * run.tokens_seen / run.total_tokens:.0f}%" if run.total_tokens else "?"
        left = f", time left ~{format_duration(run.eta_s)}" if run.eta_s is not None else ""
        return f"running ({done}{left})"
    if run.status == "stopped":
        return f"stopped at step {run.last_step} of {run.max_steps}"
    return run.status if run.kind == "trainer" else run.kind


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
