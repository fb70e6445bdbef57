"""Multi-query associative recall (Zoology's MQAR) on the two-layer models of the Based paper's figure 2.

    python tools/mqar.py --preset based-d128-f16 --out runs/mqar/based-d128-f16.json
    python tools/mqar.py --preset attention-d64 --lrs 1e-3,3.16e-3 --jobs 2

Data (`make_mqar`, Zoology's `multiquery_ar`): vocabulary 8192, keys from [1, 4096), values from
[4096, 8192), distinct within an example; the sequence is the key-value block followed by a query region
in which every key is asked once, at an even offset drawn without replacement from a power law
p(g) ~ g^(a-1), a = 0.01; the other query-region tokens are uniform random noise. The label of a query
position is its value, -100 elsewhere. Train: (L=64, kv=4) 100k, (128, 8), (256, 16), (256, 32),
(256, 64) 20k each; test: 1k each of (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128),
(1024, 256), the last two longer than anything trained on.

Model (`tools/mqar_models.py`, `--overrides '{"arch": ...}'`): "zoology" (default) is Zoology's two-block model
of the Based paper's figure 2 with our mixers inside: embedding with dropout 0.1, LayerNorm pre-norm blocks
whose Identity state mixer hands LayerNorm2(residual) on to the next block, layer 0 Zoology's BaseConv
(causal depthwise conv k=3 times a d x d Linear, plus the input), layer 1 the mixer under test: Taylor linear
attention with 1 head, head_dim = d_model, `feature_dim` f ("based-d{d}-f{f}"), or full softmax attention
with 1 head and no position encoding ("attention-d{d}"); tied head. "based_layers" is our published-Based
stack instead (RMSNorm, the published BaseConv with in/out projections and a SiLU gate).

Training as Zoology's trainer: fp32 (`precision`; "bf16" autocasts), AdamW (wd 0.1), cosine over epochs to 0
stepped once per epoch, no warmup, batch 256 from one segment at a time in a fixed order, up to 32 epochs,
stop once the test accuracy exceeds 0.99; lr swept over {1e-3, 3.16e-3, 1e-2, 3.16e-2}, best reported.
Accuracy: per example over its labelled positions, mean over all test examples (each segment weighs the
same), plus each segment's mean. Deviations: the attention mixer has no biases and no attention dropout;
the loss and logits are computed only at the labelled positions (the same loss, less work).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.mqar_models import ARCHES, build  # noqa: E402

TRAIN_SEGMENTS = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
TEST_SEGMENTS = ((64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000), (256, 64, 1000), (512, 128, 1000),
                 (1024, 256, 1000))
PAPER_LRS = (1e-3, 3.16e-3, 1e-2, 3.16e-2)


@dataclass
class MQARConfig:
    """One MQAR run."""

    mixer: str = "linear_attn"  # "linear_attn" (Based) or "attention"
    d_model: int = 128
    feature_dim: int = 16
    vocab_size: int = 8192
    train_segments: tuple = TRAIN_SEGMENTS
    test_segments: tuple = TEST_SEGMENTS
    batch_size: int = 256
    test_batch_size: int = 256
    epochs: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    stop_accuracy: float = 0.99
    seed: int = 0
    max_minutes: float = 0.0  # 0 = no limit; else stop training after this long and evaluate
    power_a: float = 0.01
    la_backend: str = "auto"
    arch: str = "zoology"  # or "based_layers" (tools/mqar_models.py)
    precision: str = "fp32"  # Zoology trains in fp32; "bf16" autocasts on CUDA
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        checks = (("mixer", self.mixer, ("linear_attn", "attention")), ("arch", self.arch, ARCHES),
                  ("precision", self.precision, ("fp32", "bf16")))
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"mqar config: {key} {value!r} is not one of {list(allowed)}")


PRESETS = {
    "based-d128-f16": dict(mixer="linear_attn", d_model=128, feature_dim=16),
    "based-d64-f16": dict(mixer="linear_attn", d_model=64, feature_dim=16),
    "based-d64-f8": dict(mixer="linear_attn", d_model=64, feature_dim=8),
    "based-d128-f24": dict(mixer="linear_attn", d_model=128, feature_dim=24),
    "attention-d64": dict(mixer="attention", d_model=64),
    "attention-d128": dict(mixer="attention", d_model=128),
    # CPU smoke version: 64-token vocabulary, short sequences, a few thousand examples
    "cpu-tiny": dict(mixer="linear_attn", d_model=48, feature_dim=8, vocab_size=64, batch_size=32,
                     train_segments=((24, 4, 3000), (32, 6, 1000)), test_segments=((24, 4, 256), (32, 6, 256)),
                     epochs=6, lr=1e-2, la_backend="reference"),
}


def make_mqar(num_examples: int, seq_len: int, num_kv: int, vocab_size: int = 8192, power_a: float = 0.01,
              seed: int = 0, random_non_queries: bool = True, chunk: int = 8192):
    """(inputs [N, L] int64, labels [N, L] int64 with -100 except at the query positions)."""
    if 4 * num_kv > seq_len:
        raise ValueError(f"MQAR needs 4 * num_kv <= seq_len; got num_kv {num_kv}, seq_len {seq_len}")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    context = 2 * num_kv
    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    inputs = np.zeros((num_examples, seq_len + 1), dtype=np.int64)
    labels = np.full((num_examples, seq_len + 1), -100, dtype=np.int64)
    for lo in range(0, num_examples, chunk):
        n = min(chunk, num_examples - lo)
        keys = 1 + _distinct(rng, n, half - 1, num_kv)
        values = half + _distinct(rng, n, half, num_kv)
        # gaps without replacement, proportional to p: the Gumbel-top-k trick
        gumbel = log_p - np.log(-np.log(rng.random((n, space))))
        gaps = np.argpartition(-gumbel, num_kv - 1, axis=1)[:, :num_kv]
        rows = np.arange(lo, lo + n)[:, None]
        inputs[rows, np.arange(0, context, 2)] = keys
        inputs[rows, np.arange(1, context, 2)] = values
        inputs[rows, context + 2 * gaps] = keys
        labels[rows, context + 2 * gaps + 1] = values
    inputs, labels = inputs[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _distinct(rng: np.random.Generator, rows: int, high: int, k: int) -> np.ndarray:
    """[rows, k] integers in [0, high), distinct within each row, uniformly."""
    if k * k > 2 * high:
        return np.argpartition(rng.random((rows, high), dtype=np.float32), k - 1, axis=1)[:, :k]
    out = rng.integers(0, high, size=(rows, k))
    while True:
        ordered = np.sort(out, axis=1)
        bad = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not bad.any():
            return out
        out[bad] = rng.integers(0, high, size=(int(bad.sum()), k))


def build_mqar_model(cfg: MQARConfig, la_backend: str = "reference"):
    """The two-layer model of `cfg.arch`: BaseConv, then Taylor linear attention (or attention); no MLPs."""
    return build(cfg.arch, cfg.mixer, cfg.d_model, cfg.feature_dim, cfg.vocab_size, la_backend)


def labelled_logits(model, input_ids: torch.Tensor, labels: torch.Tensor):
    """Logits [N_labelled, V] at the positions with a label, and those labels [N_labelled]."""
    where = labels != -100
    return model.lm_head(model.hidden(input_ids)[where]).float(), labels[where]


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")


@torch.no_grad()
def evaluate(model, test_sets, batch_size: int, device: torch.device, precision: str = "fp32") -> dict:
    """{"accuracy": mean over all examples of per-example accuracy, "segments": {"L-kv": accuracy}}."""
    model.eval()
    per_segment = {}
    all_scores = []
    for (seq_len, num_kv, _), (inputs, labels) in test_sets:
        scores = []
        for lo in range(0, len(inputs), batch_size):
            x, y = inputs[lo: lo + batch_size].to(device), labels[lo: lo + batch_size].to(device)
            with _autocast(device, precision):
                h = model.hidden(x)
            where = y != -100
            pred = model.lm_head(h.float()[where].to(model.lm_head.weight.dtype)).argmax(-1)
            correct = torch.zeros_like(y, dtype=torch.float32)
            correct[where] = (pred == y[where]).float()
            scores.append(correct.sum(1) / where.sum(1).clamp(min=1))
        scores = torch.cat(scores)
        per_segment[f"L{seq_len}-kv{num_kv}"] = scores.mean().item()
        all_scores.append(scores)
    model.train()
    return {"accuracy": torch.cat(all_scores).mean().item(), "segments": per_segment}


def _pick_la_backend(cfg: MQARConfig, device: torch.device) -> str:
    """"auto" is the plain-PyTorch reference in fp32, with which every recorded MQAR result was produced
    (about 22 s per epoch with five runs sharing one H100). On the GPU the Triton kernel would multiply fp32
    inputs in tf32, not the fp32 of Zoology's runs, and has not been run through a full MQAR sweep; opt in
    with --overrides '{"la_backend": "triton"}'."""
    if cfg.la_backend in ("auto", "reference") or cfg.mixer != "linear_attn":
        return "reference"
    return cfg.la_backend


def train(cfg: MQARConfig, device: str = "auto", log=print) -> dict:
    """Train one model at one learning rate; returns the result dict (accuracy, per segment, timings)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    start = time.time()
    torch.manual_seed(cfg.seed)
    train_sets = [make_mqar(n, L, kv, cfg.vocab_size, cfg.power_a, seed=cfg.seed * 1000 + i)
                  for i, (L, kv, n) in enumerate(cfg.train_segments)]
    test_sets = [((L, kv, n), make_mqar(n, L, kv, cfg.vocab_size, cfg.power_a, seed=2**31 + cfg.seed * 1000 + i))
                 for i, (L, kv, n) in enumerate(cfg.test_segments)]
    data_s = time.time() - start
    backend = _pick_la_backend(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_mqar_model(cfg, backend).to(device).train()
    batches = [(s, lo) for s, (inputs, _) in enumerate(train_sets) for lo in range(0, len(inputs), cfg.batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    planned = {"epochs": cfg.epochs}
    history, step, stopped = [], 0, "epochs"
    train_start = time.time()
    epoch = 0
    while epoch < planned["epochs"]:
        # Zoology's CosineAnnealingLR(T_max=epochs, eta_min=0), stepped once per epoch
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / planned["epochs"]))
        loss = _train_epoch(model, optimizer, train_sets, batches, cfg.batch_size, device, cfg.precision)
        step += len(batches)
        result = evaluate(model, test_sets, cfg.test_batch_size, device, cfg.precision)
        elapsed = time.time() - train_start
        history.append({"epoch": epoch + 1, "step": step, "loss": loss,
                        "accuracy": result["accuracy"], "seconds": round(elapsed, 1)})
        name = f"based d{cfg.d_model} f{cfg.feature_dim}" if cfg.mixer == "linear_attn" else f"attention d{cfg.d_model}"
        log(f"[{name} lr {cfg.lr:g}] epoch {epoch + 1}/{planned['epochs']}: "
            f"loss {history[-1]['loss']:.3f} acc {result['accuracy']:.4f} ({elapsed:.0f} s)")
        if result["accuracy"] > cfg.stop_accuracy:
            stopped = "accuracy"
            break
        epoch += 1
        if cfg.max_minutes and epoch == 1:
            # a time budget: plan the cosine over the epochs that fit (the first one already ran)
            planned["epochs"] = max(1, min(cfg.epochs, int(60 * cfg.max_minutes / elapsed)))
            stopped = "time" if planned["epochs"] < cfg.epochs else stopped
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "device": str(device),
            "la_backend": backend, "parameters": sum(p.numel() for p in model.parameters()),
            "accuracy": result["accuracy"], "segments": result["segments"], "epochs_run": len(history),
            "steps": step, "stopped_by": stopped, "train_seconds": round(time.time() - train_start, 1),
            "data_seconds": round(data_s, 1), "history": history}


def _train_epoch(model, optimizer, train_sets, batches, batch_size: int, device: torch.device,
                 precision: str) -> float:
    """One pass over the batches in their fixed order; returns the mean loss."""
    losses = []
    for s, lo in batches:
        inputs, labels = train_sets[s]
        x = inputs[lo: lo + batch_size].to(device, non_blocking=True)
        y = labels[lo: lo + batch_size].to(device, non_blocking=True)
        with _autocast(device, precision):
            logits, targets = labelled_logits(model, x, y)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean().item()


def _config(preset: str, overrides: dict) -> MQARConfig:
    if preset not in PRESETS:
        raise SystemExit(f"mqar: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return MQARConfig(**{**PRESETS[preset], **overrides})


def sweep(preset: str, lrs: list[float], jobs: int, overrides: dict, device: str, out: Path | None) -> dict:
    """Run every lr (in `jobs` parallel processes when > 1); the best by accuracy is the preset's result."""
    if jobs <= 1:
        runs = [train(_config(preset, {**overrides, "lr": lr}), device) for lr in lrs]
    else:
        runs = _parallel(preset, lrs, jobs, overrides, device)
    best = max(runs, key=lambda r: r["accuracy"])
    summary = {"preset": preset, "best_lr": best["config"]["lr"], "accuracy": best["accuracy"],
               "segments": best["segments"], "runs": runs}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _parallel(preset: str, lrs: list[float], jobs: int, overrides: dict, device: str) -> list[dict]:
    """One subprocess per lr (at most `jobs` at a time); small models leave the GPU mostly idle."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="mqar_"))
    pending, running, results = list(lrs), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            lr = pending.pop(0)
            out = tmp / f"lr{lr:g}.json"
            cmd = [sys.executable, __file__, "--preset", preset, "--lrs", str(lr), "--device", device,
                   "--out", str(out), "--overrides", json.dumps(overrides)]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            running.append((lr, out, subprocess.Popen(cmd, env=env)))
        time.sleep(1.0)
        for item in list(running):
            lr, out, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0 or not out.is_file():
                    raise RuntimeError(f"mqar: the run with lr {lr:g} failed (exit code {proc.returncode})")
                results[lr] = json.loads(out.read_text())["runs"][0]
    return [results[lr] for lr in lrs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="based-d128-f16", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in PAPER_LRS), help="comma-separated sweep")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes for the sweep")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="per run: stop training after this long")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON with every run and the best")
    parser.add_argument("--overrides", default="{}", help="JSON dict of MQARConfig fields")
    args = parser.parse_args(argv)
    overrides = json.loads(args.overrides)
    for key, value in (("epochs", args.epochs), ("max_minutes", args.max_minutes), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    lrs = [float(x) for x in args.lrs.split(",") if x]
    summary = sweep(args.preset, lrs, args.jobs, overrides, args.device, args.out)
    print(f"{args.preset}: best lr {summary['best_lr']:g}, accuracy {summary['accuracy']:.4f}")
    for name, acc in summary["segments"].items():
        print(f"  {name:>12}: {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
