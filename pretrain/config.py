"""Training configuration: YAML read with OmegaConf into one dataclass schema.

Schema defaults are the published recipe (AdamW 8e-4 -> 8e-5 cosine, betas (0.9, 0.95), wd 0.1, clip 1.0,
256 x 2048 tokens per step); a YAML file states what differs. Overrides on the command line are
`key.sub=value`. Every derived number (accumulation, tokens per step, total tokens) comes from `derive()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from based_layers.config import ModelConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and what was expected."""


@dataclass
class DataConfig:
    path: str = "data/tiny"
    seq_len: int = 2048
    global_batch_size: int = 256
    micro_batch_size: int = 8
    seed: int = 42
    num_workers: int = 2
    reset_state_at_doc_boundaries: bool = False
    val_max_samples: int = 1000
    val_batch_size: int = 0


@dataclass
class OptimConfig:
    lr: float = 8e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # published quirk: the norm classes are not on the no-decay list, so RMSNorm weights are decayed
    decay_norm_weights: bool = True
    grad_clip: float = 1.0
    fused: str = "auto"


@dataclass
class ScheduleConfig:
    max_steps: int = 20000
    warmup_steps: int = 200
    warmup_init_lr: float = 1e-6
    min_lr: float = 8e-5


COMPILE_CHOICES = ("auto", "true", "false")


@dataclass
class ParallelConfig:
    dp: int = -1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    # layers per pipeline stage (one entry per stage); empty = balanced by the FLOPs model
    pp_stage_layers: list[int] = field(default_factory=list)
    fsdp: bool = False
    activation_checkpoint: bool = False
    # torch.compile each block: "auto" = on for CUDA runs, eager on CPU; "true" / "false" force it (YAML
    # booleans are accepted). pretrain/parallelize.py `compile_decision` says when auto falls back.
    compile: str = "auto"
    # the torch.compile backend: inductor (generated kernels); aot_eager or eager trace without generating
    # kernels (for debugging a compile problem, and for CPU tests)
    compile_backend: str = "inductor"


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep_last: int = 3
    keep_every: int = 0
    async_save: bool = False
    resume: str = "auto"


@dataclass
class LoggingConfig:
    log_interval: int = 10
    val_interval: int = 1000
    tensorboard: bool = True
    progress_bar: bool = True
    # dense peak of one device for MFU; 0 = known GPUs by name (H100/H200 989), else MFU is not reported
    peak_tflops_per_device: float = 0.0


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str = ""
    account: str = ""
    time_limit: str = "24:00:00"
    signal_seconds_before_end: int = 300


@dataclass
class DebugConfig:
    """Fault injection for tests of the non-finite policy: the loss of these steps is made NaN."""

    nan_loss_at_steps: list[int] = field(default_factory=list)


@dataclass
class TrainConfig:
    run_name: str = "run"
    run_dir: str = ""
    seed: int = 1111
    device: str = "auto"
    precision: str = "bf16"
    deterministic: bool = False
    nonfinite_policy: str = "skip"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.run_name}")


@dataclass(frozen=True)
class Derived:
    """Numbers that follow from the config and the world size; computed only here."""

    world_size: int
    dp: int
    grad_accum: int
    tokens_per_step: int
    total_tokens: int
    val_batch_size: int


def derive(cfg: TrainConfig, world_size: int = 1) -> Derived:
    """Check the batch arithmetic for `world_size` processes and return the derived numbers."""
    par = cfg.parallel
    model_parallel = par.tp * par.pp
    if world_size % model_parallel:
        raise ConfigError(f"parallel: world size {world_size} is not divisible by tp*pp = {model_parallel}")
    dp = world_size // model_parallel if par.dp == -1 else par.dp
    if dp * model_parallel != world_size:
        raise ConfigError(f"parallel: dp*tp*pp = {dp}*{par.tp}*{par.pp} = {dp * model_parallel} but the world size is "
                          f"{world_size}; set parallel.dp=-1 to infer it or launch {dp * model_parallel} processes")
    rows = cfg.data.micro_batch_size * dp
    if cfg.data.global_batch_size % rows:
        raise ConfigError(f"data.global_batch_size {cfg.data.global_batch_size} is not a multiple of "
                          f"micro_batch_size x dp = {cfg.data.micro_batch_size} x {dp}")
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    return Derived(world_size=world_size, dp=dp, grad_accum=cfg.data.global_batch_size // rows,
                   tokens_per_step=tokens_per_step, total_tokens=tokens_per_step * cfg.schedule.max_steps,
                   val_batch_size=cfg.data.val_batch_size or cfg.data.micro_batch_size)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read `path` (YAML) over the schema defaults, apply `key.sub=value` overrides, validate."""
    schema = OmegaConf.structured(TrainConfig)
    source = "<defaults>"
    try:
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"{path}: config file not found")
            schema = OmegaConf.merge(schema, OmegaConf.load(path))
        if overrides:
            source = f"command-line overrides {overrides}"
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(overrides)))
        cfg: TrainConfig = OmegaConf.to_object(schema)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise ConfigError(_describe_omegaconf_error(err, source)) from None
    problems = validate(cfg)
    if problems:
        raise ConfigError(f"{path or '<defaults>'}: invalid config:\n  " + "\n  ".join(problems))
    return cfg


def _describe_omegaconf_error(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return f"{source}: unknown key '{key}' (check the spelling; valid keys are the fields of the schema in pretrain/config.py)"
    msg = str(err).splitlines()[0]
    return f"{source}: key '{key}': {msg}"


def validate(cfg: TrainConfig) -> list[str]:
    """Problems that types alone do not catch, as `key: what is wrong` lines."""
    problems = list(cfg.model.validate())
    if cfg.precision not in ("bf16", "fp32"):
        problems.append(f"precision: {cfg.precision!r}; expected 'bf16' or 'fp32'")
    if cfg.nonfinite_policy not in ("skip", "stop"):
        problems.append(f"nonfinite_policy: {cfg.nonfinite_policy!r}; expected 'skip' or 'stop'")
    if cfg.parallel.pp_schedule not in ("1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"):
        problems.append(f"parallel.pp_schedule: {cfg.parallel.pp_schedule!r}; expected 1f1b, interleaved_1f1b, gpipe or zero_bubble")
    if str(cfg.parallel.compile).lower() not in COMPILE_CHOICES:
        problems.append(f"parallel.compile: {cfg.parallel.compile!r}; expected auto, true or false")
    if cfg.parallel.compile_backend not in ("inductor", "aot_eager", "eager"):
        problems.append(f"parallel.compile_backend: {cfg.parallel.compile_backend!r}; expected inductor, aot_eager "
                        "or eager")
    # (not layer_mixers(): it assumes the layer lists that model.validate() may have just rejected)
    uses_mamba = cfg.model.default_mixer == "mamba" or "mamba" in cfg.model.mixer_layers
    if uses_mamba and cfg.model.mamba.backend == "mamba_ssm" and cfg.data.reset_state_at_doc_boundaries:
        problems.append("data.reset_state_at_doc_boundaries=true with model.mamba.backend=mamba_ssm: mamba-ssm's "
                        "fused scan cannot reset at document starts (the sequential reference scan would run, about "
                        "100x slower on GPU); set data.reset_state_at_doc_boundaries=false (as the published Mamba "
                        "runs) or model.mamba.backend=reference")
    if cfg.schedule.warmup_steps > cfg.schedule.max_steps:
        problems.append("schedule.warmup_steps: larger than schedule.max_steps")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas: {cfg.optim.betas}; expected two numbers")
    for key, value in (("data.seq_len", cfg.data.seq_len), ("data.global_batch_size", cfg.data.global_batch_size),
                       ("data.micro_batch_size", cfg.data.micro_batch_size), ("schedule.max_steps", cfg.schedule.max_steps)):
        if value <= 0:
            problems.append(f"{key}: {value}; expected a positive number")
    return problems


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into the run folder and every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
