"""tools/report.py: reports on tiny runs trained here, metrics read back, figures, data checks, published merge."""

import json
import math
import os
import shutil
import signal
import statistics
import struct
import time
from pathlib import Path

import pytest

from tools.report import main, merge_published, milestones, value_at, write_report
from tools.report_figures import DPI, FIGSIZE
from tools.run_reader import RunFolderError, read_metrics, read_run, sessions_wall

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
TRAIN = (
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    f"schedule.max_steps={STEPS}",
    "schedule.warmup_steps=2",
    "logging.log_interval=1",
    "logging.val_interval=4",
    "checkpoint.interval=0",
    "data.global_batch_size=8",
    "data.micro_batch_size=8",
    "data.val_max_samples=16",
)


def _train(config: str, data: Path, run_dir: Path, *overrides: str) -> None:
    """pretrain.train in this process (a subprocess would spend most of its time importing torch); the
    trainer's signal handlers are put back afterwards."""
    from pretrain.train import main as train_main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        config_path = str(ROOT / "configs" / f"{config}.yaml")
        assert train_main([config_path, f"data.path={data}", f"run_dir={run_dir}", *TRAIN, *overrides]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """{family: run folder} of based/attn/mamba tiny, 8 steps each on the generated corpus."""
    root = tmp_path_factory.mktemp("report_runs")
    for family in ("based", "attn", "mamba"):
        _train(f"{family}_tiny", tiny_data, root / family)
    return {family: root / family for family in ("based", "attn", "mamba")}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cut_short(src: Path, dst: Path, last_step: int, age_s: float) -> Path:
    """A copy of a run whose metrics end at `last_step`, last written `age_s` ago (a stopped or live run)."""
    shutil.copytree(src, dst)
    rows = [r for r in _rows(src) if r["step"] <= last_step]
    metrics = dst / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp = time.time() - age_s
    os.utime(metrics, (stamp, stamp))
    return dst


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _table_rows(report: str, heading: str) -> list[list[str]]:
    """Cells of the first table after `heading`, without its header and rule."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 : end]]


def test_report_on_three_runs_and_a_stopped_one(tiny_runs, tmp_path):
    stopped = _cut_short(tiny_runs["based"], tmp_path / "based_stopped", last_step=5, age_s=3600)
    folders = [tiny_runs["based"], tiny_runs["attn"], tiny_runs["mamba"], stopped]
    out = tmp_path / "report"
    assert main([str(f) for f in folders] + ["--out", str(out)]) == 0
    report = (out / "report.md").read_text()

    runs = {r[3].strip("`"): r for r in _table_rows(report, "## Runs")}
    for family in ("based", "attn", "mamba"):
        rows = _rows(tiny_runs[family])
        last_val = [r["val/loss"] for r in rows if "val/loss" in r][-1]
        last_train = [r["train/loss"] for r in rows if "train/loss" in r][-1]
        row = runs[str(tiny_runs[family])]
        assert row[4] == "finished" and row[5] == f"{STEPS} / {STEPS}"
        assert row[7] == f"{last_train:.4f}" and row[8] == f"{last_val:.4f}"
    assert runs[str(stopped)][4] == f"stopped at step 5 of {STEPS}"

    # 8 steps x 8 x 128 tokens, validation every 4 steps: milestones at quarters of 8,192 reached from 4,096
    header = [
        ln
        for ln in report.split("## Validation loss at token milestones")[1].splitlines()
        if ln.startswith("|")
    ][0]
    assert header.endswith("| 4.1k | 6.14k | 8.19k |")
    milestone = {r[0]: r for r in _table_rows(report, "## Validation loss at token milestones")}
    vals = {r["step"]: r["val/loss"] for r in _rows(tiny_runs["attn"]) if "val/loss" in r}
    middle = (vals[4] + vals[8]) / 2  # 6,144 tokens lies half way between the validations at 4,096 and 8,192
    assert milestone["`attn_tiny`"][4] == f"{middle:.4f} ({math.exp(middle):.2f})"
    assert milestone["`attn_tiny`"][5].startswith(f"{vals[8]:.4f} ")

    perf = {r[0]: r for r in _table_rows(report, "## Throughput and cost")}
    rows = [r for r in _rows(tiny_runs["mamba"]) if "perf/tokens_per_s" in r]
    assert perf["`mamba_tiny`"][1] == "1"
    assert (
        perf["`mamba_tiny`"][3]
        == f"{statistics.median(r['perf/tokens_per_s_per_device'] for r in rows):,.0f}"
    )
    assert "All 3 trainer runs read the same data" not in report  # four trainer runs here
    assert "All 4 trainer runs read the same data" in report

    for name in ("loss_vs_tokens.png", "state_vs_recall.png"):
        assert _png_size(out / name) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
        from PIL import Image

        with Image.open(out / name) as image:
            image.verify()


def test_live_run_is_marked_running_with_time_left(tiny_runs, tmp_path):
    live = _cut_short(tiny_runs["attn"], tmp_path / "attn_live", last_step=6, age_s=0)
    run = read_run(live)
    assert run.status == "running" and run.last_step == 6 and run.tokens_seen == 6 * 1024
    recent = statistics.median([r["perf/tokens_per_s"] for r in _rows(live) if "perf/tokens_per_s" in r][-5:])
    assert run.eta_s == pytest.approx((STEPS - 6) * 1024 / recent)
    write_report([run], tmp_path / "out")
    assert "running (75%, time left ~" in (tmp_path / "out" / "report.md").read_text()
    os.utime(live / "metrics.jsonl", (time.time() - 3600,) * 2)
    assert read_run(live).status == "stopped"


def test_different_data_and_order_are_flagged(tiny_runs, tiny_data, tmp_path):
    other_data = tmp_path / "other_data"
    shutil.copytree(tiny_data, other_data)
    manifest = json.loads((other_data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # as if prepared from other text
    (other_data / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "attn_other_data"
    shutil.copytree(tiny_runs["attn"], other)
    config = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(config.replace(f"path: {tiny_data}", f"path: {other_data}"))
    reseeded = tmp_path / "mamba_seed7"
    shutil.copytree(tiny_runs["mamba"], reseeded)
    config = (reseeded / "config.yaml").read_text()
    assert "  seed: 42\n" in config
    (reseeded / "config.yaml").write_text(config.replace("  seed: 42\n", "  seed: 7\n"))

    runs = [read_run(p) for p in (tiny_runs["based"], other, reseeded)]
    report = write_report(runs, tmp_path / "out").read_text()
    data = report.split("## Data")[1].split("##")[0]
    assert "read the same data" not in data
    assert "**`attn_tiny` differs from `based_tiny`**: different data (manifest fingerprint" in data
    assert f"data.path `{other_data}` vs `{tiny_data}`" in data
    assert "**`mamba_tiny` differs from `based_tiny`**: different order (data.seed 7 vs 42)" in data


def test_a_folder_that_is_not_a_run_is_named_in_the_error(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: not a run folder: no config.yaml" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RunFolderError, match="no such folder"):
        read_run(tmp_path / "missing")


def test_metrics_reader_handles_nan_null_resumes_and_a_torn_last_line(tmp_path):
    lines = [
        '{"step": 1, "train/loss": 5.0, "time/elapsed_s": 1.0}',
        '{"step": 2, "train/loss": NaN, "time/elapsed_s": 2.0}',
        '{"step": 2, "val/loss": 4.5, "time/elapsed_s": 2.5}',
        '{"step": 3, "train/loss": 4.0, "time/elapsed_s": 3.0}',
        '{"step": 4, "train/loss": 3.9, "time/elapsed_s": 4.0}',
        # resumed from the checkpoint at step 2: steps 3 and 4 are redone, the old ones superseded
        '{"step": 3, "train/loss": null, "time/elapsed_s": 0.5}',
        '{"step": 4, "train/loss": 3.5, "time/elapsed_s": 1.5}',
        '{"step": 5, "train/lo',
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines))
    rows, raw, warnings = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert math.isnan(rows[1]["train/loss"]) and rows[1]["val/loss"] == 4.5
    assert rows[2]["train/loss"] is None and rows[3]["train/loss"] == 3.5
    assert len(raw) == 7 and "incomplete last line" in warnings[0]
    assert sessions_wall(raw) == [(4.0, None), (1.5, None)]
    # rows that pretrain/metrics.py moved to metrics.superseded.jsonl are the ends of sessions: their span counts
    assert sessions_wall(
        [{"step": 5, "time/elapsed_s": 9.0}, {"step": 6, "time/elapsed_s": 12.0}], tails=True
    ) == [(3.0, None)]
    path.write_text("\n".join(lines[:2] + ["not json"] + lines[3:5]))
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:3: not a metrics row"):
        read_metrics(path)


def test_milestones_and_interpolation():
    assert milestones([10_485_760_000, 52_428_800_000], first=524_288_000) == [
        1_000_000_000,
        2_000_000_000,
        5_000_000_000,
        10_000_000_000,
        20_000_000_000,
        50_000_000_000,
    ]
    assert milestones([10_485_760_000], first=524_288_000, count=3) == [
        2_000_000_000,
        5_000_000_000,
        10_000_000_000,
    ]
    # fewer than three of the 1-2-5 series fit: quarters of the shortest run, from the first validation on
    assert milestones([8192, 16384], first=4096) == [4096, 6144, 8192]
    tokens, values = [100, 200, 400], [3.0, 2.0, 1.0]
    assert value_at(tokens, values, 200) == 2.0
    assert value_at(tokens, values, 150) == pytest.approx(2.5)
    assert value_at(tokens, values, 300) == pytest.approx(1.5)
    assert value_at(tokens, values, 50) is None and value_at(tokens, values, 401) is None
    assert math.isnan(value_at([100, 200], [math.nan, 2.0], 150))


def test_published_merge_matches_family_size_and_tokens():
    published = [
        {
            "family": "based",
            "size": "360m",
            "params": 362_620_928,
            "tokens": 10_485_760_000,
            "swde": 25.65,
            "fda": 14.34,
            "squad_completion": 24.23,
        },
        {
            "family": "attn",
            "size": "360m",
            "params": 359_800_000,
            "tokens": 10_485_760_000,
            "swde": 56.26,
            "fda": 57.89,
            "squad_completion": 27.85,
        },
    ]
    ours = [
        {
            "name": "based_360m_10b",
            "family": "based",
            "params": 362_620_928,
            "tokens": 10_485_760_000,
            "recall": {"swde": 27.0, "fda": 14.0},
        },
        {
            "name": "based_360m_imported",
            "family": "based",
            "params": 362_620_928,
            "tokens": None,
            "recall": {"swde": 25.65},
        },
        {
            "name": "based_360m_50b",
            "family": "based",
            "params": 362_620_928,
            "tokens": 52_428_800_000,
            "recall": {"swde": 40.0},
        },
        {
            "name": "based_1b",
            "family": "based",
            "params": 1_349_453_056,
            "tokens": 10_485_760_000,
            "recall": {"swde": 40.0},
        },
    ]
    rows = merge_published(ours, published)
    assert [(r["published"]["family"], r["ours"] and r["ours"]["name"]) for r in rows] == [
        ("based", "based_360m_10b"),
        ("based", "based_360m_imported"),
        ("attn", None),
    ]
    assert rows[0]["diff"] == {"swde": pytest.approx(1.35), "fda": pytest.approx(-0.34)}
    assert rows[1]["diff"] == {"swde": 0.0}
    assert rows[2]["diff"] == {}


def test_recall_results_in_the_run_folder_are_tabled_beside_the_published_ones(tiny_runs, tmp_path):
    from pretrain.config import load_config, to_yaml

    run = (
        tmp_path / "based_360m_10b"
    )  # a run folder of the published 360M config, evaluated, metrics not copied
    (run / "eval" / "based_pretrain").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(ROOT / "configs" / "based_360m_10b.yaml")))
    old = {"results": {"swde": {"contains,none": 0.10}}}
    new = {
        "results": {
            "swde": {"alias": "swde", "contains,none": 0.27, "contains_stderr,none": 0.01},
            "fda": {"contains,none": 0.1434},
            "squad_completion": {"contains,none": 0.2},
        }
    }
    (run / "eval" / "based_pretrain" / "results_2026-11-30.json").write_text(json.dumps(old))
    (run / "eval" / "based_pretrain" / "results_2026-12-01.json").write_text(json.dumps(new))
    os.utime(run / "eval" / "based_pretrain" / "results_2026-11-30.json", (time.time() - 60,) * 2)
    mqar = {"preset": "based-d128-f16", "best_lr": 0.01, "accuracy": 0.9873, "segments": {"L64-kv4": 0.9998}}
    (run / "eval" / "mqar-based-d128-f16.json").write_text(json.dumps({**mqar, "runs": []}))

    report = write_report([read_run(tiny_runs["attn"]), read_run(run)], tmp_path / "out").read_text()
    assert _table_rows(report, "## Recall") == [
        ["Based", "363M", "`based_360m_10b`", "27.00", "14.34", "20.00"]
    ]
    compared = _table_rows(report, "Published numbers beside ours")
    assert compared[0] == [
        "Based",
        "360m",
        "`based_360m_10b`",
        "27.00 / 25.65 (+1.35)",
        "14.34 / 14.34 (+0.00)",
        "20.00 / 24.23 (-4.23)",
    ]
    assert compared[1] == ["Mamba", "360m", "–", "– / 17.28", "– / 5.90", "– / 24.83"]
    assert len(compared) == 6
    assert _table_rows(report, "MQAR")[0][:4] == ["`based_360m_10b`", "based-d128-f16", "0.01", "0.9873"]
    state = {r[0]: r for r in _table_rows(report, "## Recurrent state and recall")}
    assert state["`based_360m_10b`"][3] == f"{read_run(run).state_bytes:,}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_imported_and_exported_folders_are_reported_without_curves(tiny_runs, tmp_path):
    import dataclasses

    from tests.tools.conftest import tiny_model
    from tools.import_hf import write_run

    imported = tmp_path / "based_imported"
    write_run(tiny_model("based"), imported, "/models/hazyresearch/based-360m")
    export = tmp_path / "mamba_export"
    export.mkdir()
    config = {"based_model": dataclasses.asdict(tiny_model("mamba").cfg), "max_position_embeddings": 512}
    (export / "config.json").write_text(json.dumps(config))
    runs = [read_run(p) for p in (tiny_runs["attn"], imported, export)]
    assert [(r.kind, r.status) for r in runs] == [
        ("trainer", "finished"),
        ("imported", "no metrics"),
        ("export", "no metrics"),
    ]
    assert runs[2].family == "mamba" and runs[2].seq_len == 512 and runs[2].state_bytes > 0
    report = write_report(runs, tmp_path / "out").read_text()
    assert (
        "- `based_imported`: trained elsewhere: no data of ours recorded (/models/hazyresearch/based-360m)"
        in report
    )
    assert "- `mamba_export`: an export: no data recorded" in report
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text(json.dumps({"n_embd": 64}))
    with pytest.raises(RunFolderError, match=r"published.*no 'based_model'.*tools/import_hf.py"):
        read_run(published)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_resumed_run_has_one_row_per_step_and_both_sessions_counted(tiny_data, tmp_path):
    run = tmp_path / "attn_resumed"
    _train("attn_tiny", tiny_data, run, "checkpoint.interval=4")
    shutil.rmtree(run / "checkpoints" / "step_00000008")  # as if the run died after step 8, before its save
    _train("attn_tiny", tiny_data, run, "checkpoint.interval=4")  # resumes at step 4, redoes 5..8
    info = read_run(run)
    assert info.status == "finished" and info.train.steps == list(range(1, STEPS + 1))
    assert info.val.steps == [4, 8]
    kept = [r["time/elapsed_s"] for r in _rows(run)]
    moved = [
        json.loads(line)["time/elapsed_s"]
        for line in (run / "metrics.superseded.jsonl").read_text().splitlines()
    ]
    restart = next(i for i in range(1, len(kept)) if kept[i] < kept[i - 1])  # the resumed process's first row
    first_session = kept[:restart]
    assert info.throughput.sessions == 2
    second_session = kept[restart:]
    assert info.throughput.wall_s == pytest.approx(
        max(first_session) + max(second_session) + max(moved) - min(moved)
    )
