"""The trainer checks the prepared data against the config before step 0 (issue 14 item 12)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datatest_utils import read_manifest

from pretrain.config import ConfigError, load_config
from pretrain.data_check import check_data_matches_config

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(data: Path, *overrides: str):
    """configs/based_tiny.yaml (model vocab 512) on `data` (seq_len 32, vocab 288)."""
    return load_config(ROOT / "configs/based_tiny.yaml", [f"data.path={data}", "data.seq_len=32", *overrides])


def test_matching_data_passes(prepared):
    assert check_data_matches_config(tiny_config(prepared)).seq_len == 32


def test_seq_len_that_differs_from_the_shards_names_both_keys(prepared):
    with pytest.raises(ConfigError, match=f"data.seq_len=64 but {prepared}/manifest.json has seq_len 32"):
        check_data_matches_config(tiny_config(prepared, "data.seq_len=64"))


def test_vocabulary_larger_than_the_models_names_both_keys(prepared):
    vocab = read_manifest(prepared)["tokenizer"]["vocab_size"]
    with pytest.raises(
        ConfigError, match=f"model.vocab_size=256 but {prepared}/manifest.json .*tokenizer.vocab_size {vocab}"
    ):
        check_data_matches_config(tiny_config(prepared, "model.vocab_size=256"))
    # a model vocabulary larger than the tokenizer's is fine (the published Mamba recipe)
    check_data_matches_config(tiny_config(prepared, "model.vocab_size=50277"))


def test_bad_tokenizer_record_and_missing_val_split_are_named(tmp_path, prepared):
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    manifest = read_manifest(folder)
    manifest["tokenizer"]["eos_id"] = manifest["tokenizer"]["vocab_size"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="tokenizer.eos_id 288 is outside tokenizer.vocab_size 288"):
        check_data_matches_config(tiny_config(folder))
    manifest["tokenizer"]["eos_id"] -= 1
    manifest["splits"]["val"]["shards"] = []
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="logging.val_interval=.* needs a validation split"):
        check_data_matches_config(tiny_config(folder))
    check_data_matches_config(tiny_config(folder, "logging.val_interval=0"))
    with pytest.raises(ConfigError, match=f"data.path={tmp_path}/nothing: .*manifest.json cannot be read"):
        check_data_matches_config(tiny_config(tmp_path / "nothing"))


def test_trainer_refuses_before_step_0(tmp_path, prepared):
    """The command the user runs: a config error (exit 2) naming the manifest; no run folder is written."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        "configs/based_tiny.yaml",
        f"data.path={prepared}",
        f"run_dir={run_dir}",
        "device=cpu",
        "logging.progress_bar=false",
        "schedule.max_steps=2",
        "schedule.warmup_steps=1",
        "data.global_batch_size=8",
        "data.micro_batch_size=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"config error: data.seq_len=128 but {prepared}/manifest.json has seq_len 32" in proc.stderr
    assert not run_dir.exists()
