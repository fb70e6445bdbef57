"""Export a checkpoint to a folder that stock `transformers` loads: `python tools/export_hf.py --checkpoint RUN --out DIR`.

DIR gets model.safetensors (our parameter names, which are the published Based names), config.json,
generation_config.json, tokenizer.json + tokenizer_config.json, the modeling code (modeling_based.py,
configuration_based.py and the bundled model source, see tools/hf/bundle.py) and export_info.json.
Then

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

work with `transformers` alone; `model.generate` runs the recurrent form.

Before DIR appears, the exporter loads the written folder through `transformers`, compares its logits with
the native model's on sample input (plain and left-padded batches) and its greedy `generate` with
tools/generate.py; any difference beyond the tolerance is an error. Everything is written to a
temporary sibling folder that is renamed to DIR only when all checks pass; on an error nothing is left.
DIR and its files get the modes the umask gives (0755 / 0644 under umask 022). export_info.json records what
was exported as RUN_NAME/checkpoints/step_N (never this machine's folders), the step, the git revision and
the verification.

CHECKPOINT: a trainer run folder (newest complete checkpoint), a checkpoint folder, or a published-format
folder (config.json + pytorch_model.bin / model.safetensors of hazyresearch/based-*, attn-*, mamba-*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.hf.bundle import REPO_ROOT, bundle_sources  # noqa: E402
from tools.model_io import LoadedModel, load_model, load_tokenizer_for  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent / "hf" / "templates"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    """The export failed; the message says what was wrong. Nothing was written to the output folder."""


def _config_json(loaded: LoadedModel, dtype: str, special: dict) -> dict:
    import dataclasses

    import transformers

    cfg = loaded.model.cfg
    based_model = dataclasses.asdict(cfg)
    # the exported code runs the plain-PyTorch references (no Triton, no mamba-ssm on the user's machine)
    for section in ("base_conv", "linear_attn", "sliding_window", "mamba"):
        based_model[section]["backend"] = "reference"
    return {
        "architectures": ["BasedForCausalLM"],
        "model_type": "based_pretrain",
        "auto_map": {"AutoConfig": "configuration_based.BasedConfig",
                     "AutoModelForCausalLM": "modeling_based.BasedForCausalLM"},
        "based_model": based_model,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "max_position_embeddings": loaded.seq_len or 2048,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
        **special,
    }


def _state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("decay.decay") else v) for k, v in state.items()}


def write_export(loaded: LoadedModel, out: Path, dtype: str, tokenizer, provenance: dict) -> dict:
    """Write every file of the export into the (existing, empty) folder `out`; returns export_info."""
    from safetensors.torch import save_file

    from tools.hf.tokenizer_export import write_tokenizer

    special = {}
    if tokenizer is not None:
        special = write_tokenizer(tokenizer, out, loaded.seq_len or 2048)
    files = bundle_sources(out)
    for template in ("configuration_based.py", "modeling_based.py"):
        shutil.copyfile(TEMPLATES / template, out / template)
    config = _config_json(loaded, dtype, special)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"do_sample": False, **special, "transformers_version": config["transformers_version"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(_state_dict(loaded.model, DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})
    info = {**provenance, "dtype": dtype, "bundled_files": files,
            "tokenizer": getattr(tokenizer, "name", None)}
    (out / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _sample_batches(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    plain = torch.randint(0, vocab, (2, 37), generator=gen)
    padded = torch.randint(0, vocab, (3, 29), generator=gen)
    mask = torch.ones_like(padded)
    mask[1, :7] = 0
    mask[2, :19] = 0
    return [(plain, None), (padded, mask)]


def _reference_model(loaded: LoadedModel, dtype: str):
    """The native model with its weights rounded to the export dtype, computing in fp32."""
    import copy

    model = copy.deepcopy(loaded.model).float().eval()
    if dtype != "float32":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(DTYPES[dtype]).float())
    return model


@torch.inference_mode()
def verify_export(out: Path, loaded: LoadedModel, dtype: str, tolerance: float = 1e-4) -> dict:
    """Load `out` with transformers and compare with the native model; raises ExportError on a mismatch."""
    from transformers import AutoModelForCausalLM

    from tools.generate import doc_ids_from_attention_mask, generate, left_pad

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
    except Exception as err:  # transformers raises many types; say what failed
        raise ExportError(f"transformers could not load the exported folder: {type(err).__name__}: {err}") from err
    hf_model.eval()
    native = _reference_model(loaded, dtype)
    vocab = native.cfg.vocab_size
    worst = 0.0
    for input_ids, mask in _sample_batches(vocab):
        got = hf_model(input_ids, attention_mask=mask).logits
        doc_ids = doc_ids_from_attention_mask(mask)
        want = native(input_ids, doc_ids=doc_ids)[..., :vocab].float()
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        scale = want[valid].abs().max().item() + 1e-6
        diff = (got - want)[valid].abs().max().item()
        worst = max(worst, diff / scale)
        if not diff <= tolerance * scale:
            raise ExportError(f"the exported model's logits differ from the native model's: max |diff| = {diff:.3g} "
                              f"(logit scale {scale:.3g}, tolerance {tolerance:g} relative) on a batch of shape "
                              f"{tuple(input_ids.shape)}{' with left padding' if mask is not None else ''}")
    prompts = [[int(t) for t in row] for row in _sample_batches(vocab, seed=1)[0][0][:, :9]]
    prompts[1] = prompts[1][:5]
    eos = hf_model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    ours = generate(native, prompts, 6, eos_id=eos).tokens
    ids, doc_ids = left_pad(prompts, pad_id=0)
    mask = torch.ones_like(ids) if doc_ids is None else doc_ids
    hf_out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs = [row[: row.index(eos) + 1] if eos in row else row for row in hf_out[:, ids.shape[1]:].tolist()]
    if theirs != ours:
        raise ExportError(f"transformers generate() of the export gives {theirs}, tools/generate.py gives {ours}")
    return {"max_relative_logit_diff": worst, "generate_check": "equal"}


def export(checkpoint: str | Path, out: str | Path, dtype: str = "float32", tokenizer_spec: str | None = None,
           with_tokenizer: bool = True, overwrite: bool = False) -> dict:
    """Export `checkpoint` to `out` (see the module docstring); returns export_info. Raises ExportError."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    try:
        loaded = load_model(checkpoint)
    except Exception as err:
        raise ExportError(f"cannot load {checkpoint}: {err}") from err
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = load_tokenizer_for(loaded, tokenizer_spec)
        except Exception as err:
            raise ExportError(f"{err} (or pass --no-tokenizer to export the model alone)") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        provenance = {"source": source_id(loaded), "source_kind": loaded.kind, "step": loaded.step,
                      "git_revision": _git_revision(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        info = write_export(loaded, staging, dtype, tokenizer, provenance)
        info["verification"] = verify_export(staging, loaded, dtype)
        (staging / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
        apply_umask(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def source_id(loaded: LoadedModel) -> str:
    """What was exported, without this machine's folders: RUN_NAME/checkpoints/step_N for a trainer
    checkpoint, else the folder's name."""
    folder = loaded.checkpoint_dir or loaded.path
    folder = Path(folder).resolve()
    if folder.parent.name == "checkpoints":
        return str(folder.relative_to(folder.parent.parent.parent))
    return folder.name


def apply_umask(root: Path) -> None:
    """Give `root` and everything in it the modes a plain mkdir / open would have under the umask:
    mkdtemp makes 0700 and safetensors writes 0600, which colleagues on a shared filesystem cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _git_revision() -> str | None:
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (REPO_ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or published-format folder")
    parser.add_argument("--out", required=True, help="output folder (created; must be new or empty)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one of the training data)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the model without tokenizer files")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, args.dtype, args.tokenizer, not args.no_tokenizer, args.overwrite)
    except ExportError as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        return 1
    check = info["verification"]
    print(f"exported {args.checkpoint} -> {args.out} ({args.dtype}); transformers logits match "
          f"(max relative diff {check['max_relative_logit_diff']:.2e}), generate() matches tools/generate.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
