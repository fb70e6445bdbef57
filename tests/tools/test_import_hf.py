"""Import of the published checkpoint format, on state dicts synthesized with the published names and shapes."""

import json
import re

import pytest
import torch
from conftest import ROOT, save_checkpoint, tiny_model, write_manifest

from based_layers import build_model
from pretrain.config import load_config
from tools.import_hf import PublishedFormatError, import_state_dict, load_published
from tools.model_io import load_model


def _published_config(model) -> dict:
    """config.json as the published checkpoints write it (reference §3.2), for our tiny model."""
    cfg = model.cfg
    if cfg.family == "mamba":
        return {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
                "ssm_cfg": {"d_state": cfg.mamba.d_state, "d_conv": cfg.mamba.d_conv, "expand": cfg.mamba.expand},
                "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple, "tie_embeddings": True}
    config = {"n_embd": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "n_inner": None,
              "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple, "activation_function": "swiglu",
              "rms_norm": True, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "qkv_proj_bias": False,
              "out_proj_bias": False, "residual_in_fp32": True, "max_position_embeddings": 0,
              "layer_norm_epsilon": 1e-5, "fused_bias_fc": True, "tie_word_embeddings": True}
    if cfg.family == "attn":
        config.update(n_head=cfg.attention.num_heads, rotary_emb_fraction=cfg.attention.rotary_fraction)
        return config
    config.update(
        n_head=cfg.sliding_window.num_heads, n_inner=cfg.mlp_hidden, rotary_emb_fraction=1,
        alt_mixer_layers=cfg.mixer_layers["linear_attn"], alt_mixer_2_layers=cfg.mixer_layers["sliding_window"],
        fixed_decay=cfg.decay_buffer,
        mixer={"_target_": "based.models.mixers.convolution.BaseConv", "l_max": 2048, "use_bias": True,
               "expand_proj": 4, "kernel_sizes": 3},
        alt_mixer={"_target_": "based.models.mixers.linear_attention.LinearAttention", "l_max": 2048,
                   "feature_dim": cfg.linear_attn.feature_dim, "num_heads": cfg.linear_attn.num_heads,
                   "feature_map": {"_target_": "based.models.mixers.linear_attention.TaylorExp",
                                   "input_dim": cfg.linear_attn.feature_dim}},
        alt_mixer_2={"_target_": "based.models.mixers.slide_attention.SlidingAttention",
                     "window_size": 2 * cfg.sliding_window.window, "num_heads": cfg.sliding_window.num_heads,
                     "causal": True})
    return config


def _published_state(model) -> dict:
    """Our state dict renamed to the published file: Lightning `model.` prefix, a metrics entry, both tied keys."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and "transformer.embeddings.word_embeddings.weight" in state
    if model.cfg.family == "mamba":
        renamed = {}
        for key, value in state.items():
            key = key.replace("transformer.embeddings.word_embeddings.", "backbone.embedding.")
            key = key.replace("transformer.ln_f.", "backbone.norm_f.")
            key = re.sub(r"^transformer\.layers\.(\d+)\.norm1\.", r"backbone.layers.\1.norm.", key)
            key = re.sub(r"^transformer\.layers\.", "backbone.layers.", key)
            renamed[key] = value
        return renamed
    state = {f"model.{k}": v for k, v in state.items()}
    state["train_metrics.num-tokens.count"] = torch.tensor(12345)
    return state


@pytest.mark.parametrize("family", ["based", "attn", "mamba"])
def test_import_equals_native(family, tmp_path):
    native = tiny_model(family)
    config, state = _published_config(native), _published_state(native)
    imported = import_state_dict(config, state)
    x = torch.randint(0, 200, (2, 23))
    with torch.no_grad():
        assert torch.equal(imported(x), native(x))
    # the same through a folder with pytorch_model.bin (read with weights_only)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(load_published(tmp_path)(x), native(x))


def test_based_published_config_semantics():
    native = tiny_model("based")
    imported = import_state_dict(_published_config(native), _published_state(native))
    assert imported.cfg.sliding_window.window == native.cfg.sliding_window.window  # window_size halved
    assert imported.cfg.linear_attn.eps == 1e-12 and imported.cfg.decay_buffer
    config = _published_config(native)
    config["alt_mixer"]["parallel_implementation"] = "fla_parallel"
    assert import_state_dict(config, _published_state(native)).cfg.linear_attn.eps == 1e-6


def test_safetensors_with_only_lm_head(tmp_path):
    """candle's safetensors conversion keeps only lm_head.weight of the tied pair."""
    from safetensors.torch import save_file

    native = tiny_model("based")
    state = {k[len("model."):]: v.contiguous() for k, v in _published_state(native).items() if k.startswith("model.")}
    del state["transformer.embeddings.word_embeddings.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(_published_config(native)))
    x = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path).model(x), native(x))


def test_strictness_and_tied_check():
    native = tiny_model("attn")
    config = _published_config(native)
    state = _published_state(native)
    state["model.lm_head.weight"] = state["model.lm_head.weight"] + 1
    with pytest.raises(PublishedFormatError, match="differ"):
        import_state_dict(config, state)
    state = _published_state(native)
    del state["model.transformer.layers.1.mlp.fc2.weight"]
    with pytest.raises(PublishedFormatError, match="missing.*layers.1.mlp.fc2.weight"):
        import_state_dict(config, state)
    state = _published_state(native)
    state["model.transformer.layers.0.mixer.rotary_emb.inv_freq"] = torch.zeros(4)
    with pytest.raises(PublishedFormatError, match="not used.*inv_freq"):
        import_state_dict(config, state)
    with pytest.raises(PublishedFormatError, match="vocab_size"):
        import_state_dict({**config, "vocab_size": 500}, _published_state(native))


def test_published_360m_names_and_shapes():
    """Our parameter names and shapes at the based-360m config are the published ones (reference §3.3)."""
    cfg = load_config(ROOT / "configs/based_360m_10b.yaml").model
    with torch.device("meta"):
        model = build_model(cfg)
    state = model.state_dict()
    assert len(state) == 226
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "transformer.embeddings.word_embeddings.weight": (50264, 1024), "lm_head.weight": (50264, 1024),
        "transformer.ln_f.weight": (1024,), "transformer.layers.0.norm1.weight": (1024,),
        "transformer.layers.0.norm2.weight": (1024,), "transformer.layers.0.mlp.fc1.weight": (4096, 1024),
        "transformer.layers.0.mlp.fc2.weight": (1024, 2048), "transformer.layers.0.mixer.in_proj.weight": (4096, 1024),
        "transformer.layers.0.mixer.in_proj.bias": (4096,), "transformer.layers.0.mixer.out_proj.weight": (1024, 2048),
        "transformer.layers.0.mixer.out_proj.bias": (1024,), "transformer.layers.0.mixer.conv.conv.weight": (2048, 1, 3),
        "transformer.layers.1.mixer.proj_q.weight": (256, 1024), "transformer.layers.1.mixer.proj_k.weight": (256, 1024),
        "transformer.layers.1.mixer.proj_v.weight": (1024, 1024), "transformer.layers.1.mixer.out_proj.weight": (1024, 1024),
        "transformer.layers.2.mixer.Wqkv.weight": (3072, 1024), "transformer.layers.2.mixer.out_proj.weight": (1024, 1024),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    per_layer = {re.sub(r"^transformer\.layers\.\d+\.", "", k) for k in state if k.startswith("transformer.layers.")}
    assert per_layer == {"norm1.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight", "mixer.in_proj.weight",
                         "mixer.in_proj.bias", "mixer.out_proj.weight", "mixer.out_proj.bias", "mixer.conv.conv.weight",
                         "mixer.proj_q.weight", "mixer.proj_k.weight", "mixer.proj_v.weight", "mixer.Wqkv.weight"}


def test_published_mamba_names():
    """mamba-ssm names (backbone.*) map onto every one of our Mamba parameters at the mamba-1b config."""
    cfg = load_config(ROOT / "configs/mamba_1b_10b.yaml").model
    with torch.device("meta"):
        model = build_model(cfg)
    ours = set(model.state_dict())
    mixer = {"A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
             "dt_proj.bias", "out_proj.weight"}
    published = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(cfg.n_layer):
        published |= {f"backbone.layers.{i}.norm.weight"} | {f"backbone.layers.{i}.mixer.{m}" for m in mixer}
    from tools.import_hf import _rename_mamba

    assert set(_rename_mamba(dict.fromkeys(published))) == ours
    assert tuple(model.state_dict()["transformer.embeddings.word_embeddings.weight"].shape) == (50288, 2048)


def test_import_cli_writes_a_resumable_run(tmp_path):
    native = tiny_model("based")
    src = tmp_path / "published"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_published_config(native)))
    torch.save(_published_state(native), src / "pytorch_model.bin")
    from tools.import_hf import main

    assert main(["--src", str(src), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 0
    x = torch.randint(0, 200, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), native(x))


def test_continued_pretraining_from_an_import(tmp_path):
    """import_hf's run folder resumes in the trainer (a few steps on the generated tiny corpus)."""
    import subprocess
    import sys

    from tools.import_hf import main

    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_pipeline.tiny_corpus", "--out", str(data), "--seq-len", "128"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    native = tiny_model("based", vocab=512)
    src = tmp_path / "published"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_published_config(native)))
    torch.save(_published_state(native), src / "pytorch_model.bin")
    run = tmp_path / "run"
    assert main(["--src", str(src), "--out", str(run)]) == 0
    cmd = [sys.executable, "-m", "pretrain.train", str(run / "config.yaml"), f"run_dir={run}", f"data.path={data}",
           "data.seq_len=128", "data.global_batch_size=8", "data.micro_batch_size=8", "data.num_workers=0",
           "schedule.max_steps=2", "schedule.warmup_steps=1", "device=cpu", "precision=fp32",
           "logging.progress_bar=false", "checkpoint.interval=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr and "step_00000000" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()


def _published_folder(root, native):
    src = root / "published"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_published_config(native)))
    torch.save(_published_state(native), src / "pytorch_model.bin")
    return src


def test_import_records_the_published_tokenizer_not_data_tiny(tmp_path, monkeypatch, sp_tokenizer):
    """Run from a checkout that has data/tiny: an imported GPT-2-vocabulary model still names tiktoken:gpt2."""

    from tools.import_hf import main

    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "data" / "tiny", f"sentencepiece:{sp_tokenizer}")
    src = _published_folder(tmp_path, tiny_model("attn", vocab=50257))
    assert main(["--src", str(src), "--out", "run"]) == 0
    assert load_model(tmp_path / "run").tokenizer_spec == "tiktoken:gpt2"
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.data.path, cfg.data.tokenizer) == ("", "tiktoken:gpt2")


def test_import_refuses_a_non_empty_out(tmp_path, capsys):
    from tools.import_hf import main

    src = _published_folder(tmp_path, tiny_model("mamba"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["--src", str(src), "--out", str(out)]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, sp_tokenizer, capsys):
    """A 300-token model whose run names a 200-token tokenizer: every tool refuses it, naming both sizes."""

    from tools import generate
    from tools.export_hf import ExportError, export
    from tools.lm_eval_model import BasedPretrainLM
    from tools.model_io import ModelLoadError, load_tokenizer_for

    run = tmp_path / "run"
    save_checkpoint(tiny_model("attn", vocab=300), run, write_manifest(tmp_path / "data", f"sentencepiece:{sp_tokenizer}"))
    message = "has 200 tokens but the model's vocabulary is 300: not this model's tokenizer"
    with pytest.raises(ModelLoadError, match=message):
        load_tokenizer_for(load_model(run))
    with pytest.raises(ModelLoadError, match=message):
        load_tokenizer_for(load_model(run), f"sentencepiece:{sp_tokenizer}")
    assert generate.main(["--checkpoint", str(run), "--prompt", "Alice", "--device", "cpu"]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(ExportError, match=message):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match=message):
        BasedPretrainLM(pretrained=str(run), device="cpu")
