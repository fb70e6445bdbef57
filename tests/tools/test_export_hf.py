"""Export to a stock-transformers folder: round trip for the three families, the checks, the failures."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, save_checkpoint, tiny_model

from data_pipeline.tokenizer import load_tokenizer
from pretrain.checkpoint import load_model_for_export
from tools import export_hf
from tools.export_hf import ExportError, export
from tools.generate import generate

FAMILIES = ["based", "attn", "mamba"]


@pytest.fixture(scope="module")
def exports(native_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {family: (export(run, root / family), root / family) for family, run in native_runs.items()}


def _no_leftovers(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_with_stock_transformers(family, exports, native_runs, sp_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info, out = exports[family]
    assert info["verification"]["generate_check"] == "equal"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_based.py", "configuration_based.py",
            "generation_config.json"} <= names
    # the exported code must not import this repository
    for path in out.glob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.lstrip().startswith(("from based_layers", "from kernels", "import based_layers",
                                                 "from tools", "from pretrain")), f"{path.name}: {line}"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    _, native = load_model_for_export(native_runs[family])
    native.eval()

    texts = ["Alice lives in Oslo and her cat", "the quick brown"]
    sp = load_tokenizer(f"sentencepiece:{sp_tokenizer}")
    assert [tok.encode(t, add_special_tokens=False) for t in texts] == [sp.encode(t) for t in texts]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and enc["attention_mask"][1, 0] == 0

    with torch.no_grad():
        logits = hf(**enc).logits
        for row, text in enumerate(texts):
            ids = sp.encode(text)
            want = native(torch.tensor([ids]))[0, :, :200]
            torch.testing.assert_close(logits[row, -len(ids):], want, rtol=1e-5, atol=1e-5)

    hf_out = hf.generate(**enc, max_new_tokens=7, do_sample=False)
    new = hf_out[:, enc["input_ids"].shape[1]:].tolist()
    ours = generate(native, [sp.encode(t) for t in texts], 7, eos_id=sp.eos_id).tokens
    eos = sp.eos_id
    assert [row[: row.index(eos) + 1] if eos in row else row for row in new] == ours
    sampled = hf.generate(**enc, max_new_tokens=4, do_sample=True, top_k=20, temperature=0.8)
    assert sampled.shape == (2, enc["input_ids"].shape[1] + 4)


def test_exported_padding_rule_matches_ours(exports):
    """The exported code carries its own copy of the attention-mask -> doc ids rule; it must stay ours."""
    from transformers import AutoModelForCausalLM

    from tools.generate import doc_ids_from_attention_mask

    _, out = exports["based"]
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    exported = sys.modules[type(hf).__module__].doc_ids_from_attention_mask
    masks = [torch.ones(2, 5, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
             torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 1]])]
    for mask in masks:
        ours, theirs = doc_ids_from_attention_mask(mask), exported(mask)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert torch.equal(ours, theirs)
    assert exported(None) is None


def test_bf16_export(native_runs, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    info = export(native_runs["based"], out, dtype="bfloat16")
    assert info["verification"]["max_relative_logit_diff"] < 1e-4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.ln_f.weight").dtype == torch.bfloat16
        assert f.get_tensor("transformer.decay.decay").dtype == torch.float32
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_corrupted_checkpoint_is_a_clear_error(native_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(native_runs["attn"], run)
    shard = next((run / "checkpoints").glob("step_*/*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="corrupted checkpoint.*sha256"):
        export(run, out)
    assert _no_leftovers(out)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, native_runs):
    # config.yaml describes one model, the weights are another's (valid hashes): the load names the key
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import CheckpointConfig, DataConfig, TrainConfig, to_yaml

    model = tiny_model("attn")
    other = tiny_model("attn", vocab=300).cfg
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 1, "tokens_seen": 0, "skipped_steps": 0, "loader": {}, "world_size": 1}
    Checkpointer(tmp_path / "run", CheckpointConfig()).save(
        1, model, optimizer, state, to_yaml(TrainConfig(model=other, data=DataConfig(path="none"))))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="(?i)cannot load .*size mismatch.*word_embeddings"):
        export(tmp_path / "run", out, with_tokenizer=False)
    assert _no_leftovers(out)


def test_missing_checkpoint_and_missing_tokenizer(tmp_path):
    with pytest.raises(ExportError, match="neither a checkpoint folder"):
        export(tmp_path, tmp_path / "out")
    run = tmp_path / "run"
    save_checkpoint(tiny_model("mamba"), run, tmp_path / "no_data_here")
    with pytest.raises(ExportError, match="--tokenizer SPEC.*--no-tokenizer"):
        export(run, tmp_path / "out")
    assert _no_leftovers(tmp_path / "out")


def test_logit_mismatch_fails_loudly_and_leaves_nothing(native_runs, tmp_path, monkeypatch):
    original = export_hf._state_dict

    def broken(model, dtype):
        state = original(model, dtype)
        state["transformer.layers.1.mixer.proj_q.weight"] = state["transformer.layers.1.mixer.proj_q.weight"] * 1.01
        return state

    monkeypatch.setattr(export_hf, "_state_dict", broken)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="logits differ"):
        export(native_runs["based"], out)
    assert _no_leftovers(out)


def test_refuses_non_empty_out(native_runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(native_runs["mamba"], out)
    assert (out / "keep.txt").read_text() == "mine"


def test_export_cli(native_runs, tmp_path, sp_tokenizer):
    out = tmp_path / "cli"
    cmd = [sys.executable, "tools/export_hf.py", "--checkpoint", str(native_runs["mamba"]), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "logits match" in proc.stdout and (out / "model.safetensors").is_file()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 1 and "export_hf: error:" in again.stderr and "not empty" in again.stderr


def test_tiktoken_tokenizer_export(tmp_path):
    """A byte-level BPE (tiktoken ranks file) converts to a tokenizer.json with the same encoding."""
    from data_pipeline.tokenizer import write_tiktoken_file
    from tools.hf.tokenizer_export import SAMPLE_TEXTS, convert

    ranks = {bytes([b]): b for b in range(256)}
    for piece in (b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a", b"er", b"an", b" an", b"on", b"12"):
        ranks[piece] = len(ranks)
    write_tiktoken_file(tmp_path / "tiny.tiktoken", ranks)
    native = load_tokenizer(f"tiktoken:{tmp_path / 'tiny.tiktoken'}")
    converted = convert(native)
    for text in SAMPLE_TEXTS + ("the thing than another",):
        assert converted.encode(text).ids == native.encode(text)
        assert converted.decode(native.encode(text)) == text
    assert converted.token_to_id("<|endoftext|>") == native.eos_id


def _modes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_modes_follow_the_umask(native_runs, tmp_path, umask):
    """mkdtemp (0700) and safetensors (0600) must not keep colleagues on a shared filesystem out."""
    old = os.umask(umask)
    try:
        export(native_runs["attn"], tmp_path / "out")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    assert modes["."] == 0o777 & ~umask and modes["model.safetensors"] == 0o666 & ~umask
    assert all(mode == (0o777 if (tmp_path / "out" / name).is_dir() else 0o666) & ~umask
               for name, mode in modes.items()), modes


def test_export_info_names_the_run_not_this_machines_folders(exports, native_runs):
    info, out = exports["based"]
    run = native_runs["based"]
    assert info["source"] == f"{run.name}/checkpoints/step_00000007" and info["step"] == 7
    assert "git_revision" in info and info["source_kind"] == "native"
    for name in ("export_info.json", "config.json", "tokenizer_config.json", "generation_config.json"):
        text = (out / name).read_text()
        assert str(run.parent) not in text and str(out) not in text, name
