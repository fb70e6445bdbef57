"""Training configuration: YAML read with OmegaConf into one dataclass schema.

Schema defaults are the published recipe (AdamW 8e-4 -> 8e-5 cosine, betas (0.9, 0.95), wd 0.1, clip 1.0,
256 x 2048 tokens per step); a YAML file states what differs. Overrides on the command line are
`key.sub=value`. Every derived number (accumulation, tokens per step, total tokens) comes from `derive()`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from based_layers.config import ModelConfig
from data_pipeline.readers import is_local


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
    # the model's tokenizer spec where no manifest at data.path names one (tools/import_hf.py writes the
    # published models' tiktoken:gpt2); the tools read it, training reads the data's manifest
    tokenizer: str = ""


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
    compile: bool = False


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
    # under `skip`: at most this many skipped steps in a row; the next non-finite step stops as `stop` does
    nonfinite_skip_limit: int = 20
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                for_training: bool = False) -> TrainConfig:
    """Read `path` (YAML) over the schema defaults, apply `key.sub=value` overrides, validate.

    Every error is a ConfigError that names where the bad value came from: the file, or the one override.
    `for_training` also checks what training reads beyond the config (the data folder); the tools, which
    load a run's config without its data, leave it off.
    """
    schema = OmegaConf.structured(TrainConfig)
    if path is not None:
        schema = _merge(schema, _read_yaml(Path(path)), str(path))
    for item in overrides or []:
        schema = _merge(schema, _parse_override(item), f"override '{item}'")
    where = _describe_sources(path, overrides)
    try:
        cfg: TrainConfig = OmegaConf.to_object(schema)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err, where)) from None
    problems = validate(cfg) + (data_problems(cfg) if for_training else [])
    if problems:
        lines = [_blame_override(problem, overrides or []) for problem in problems]
        raise ConfigError(f"{where}: invalid config:\n  " + "\n  ".join(lines))
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    """The YAML file as an (untyped) DictConfig; a syntax error names the line and column."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_describe_yaml_error(err)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, optim: ...), "
                          f"found a {type(raw).__name__}")
    return raw


def _parse_override(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key.sub=value, e.g. optim.lr=3e-4")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML: {_describe_yaml_error(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None


def _merge(schema: DictConfig, raw: DictConfig, source: str) -> DictConfig:
    """`raw` (from `source`) over `schema`; a wrong key or type is an error naming `source` and the key."""
    container = OmegaConf.to_container(raw, resolve=False)
    not_whole = _floats_in_int_fields(container, TrainConfig, "")
    if not_whole:
        raise ConfigError(f"{source}: " + "; ".join(not_whole))
    try:
        return OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err, source)) from None


def _floats_in_int_fields(value: Any, hint: Any, key: str) -> list[str]:
    """`key 'k': 2.5 is not a whole number` for every float given to an int field: checked here, not left to
    the OmegaConf version at hand, so that a step count is never a truncated float."""
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        return [p for name, v in value.items() if name in hints
                for p in _floats_in_int_fields(v, hints[name], f"{key}.{name}" if key else str(name))]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _floats_in_int_fields(v, args[0], f"{key}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [p for name, v in value.items() for p in _floats_in_int_fields(v, args[1], f"{key}.{name}")]
    if hint is int and isinstance(value, float):
        return [f"key '{key}': {value!r} is not a whole number (the key takes an integer)"]
    return []


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    start = getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if context and start is not None:
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _describe_sources(path: str | Path | None, overrides: list[str] | None) -> str:
    where = str(path) if path is not None else "<defaults>"
    return f"{where} with overrides {list(overrides)}" if overrides else where


def _blame_override(problem: str, overrides: list[str]) -> str:
    """`problem` (a `key: ...` line), followed by the override that set that key or a section above it."""
    key = problem.split(":", 1)[0].strip()
    for item in reversed(overrides):
        name = item.split("=", 1)[0].strip()
        if key == name or key.startswith(name + ".") or key.startswith(name + "["):
            return f"{problem} (set by override '{item}')"
    return problem


def _describe_omegaconf_error(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return f"{source}: unknown key '{key}' (check the spelling; valid keys are the fields of the schema in pretrain/config.py)"
    msg = str(err).splitlines()[0]
    return f"{source}: key '{key}': {msg}"


def data_problems(cfg: TrainConfig) -> list[str]:
    """What training needs of `data.path` beyond the config: a local folder must hold a prepared manifest."""
    path = cfg.data.path
    if not path:
        return ["data.path: empty; set data.path=DIR, a folder made by `python -m data_pipeline.prepare`"]
    if not is_local(path):
        return []
    folder = Path(path[len("file://"):] if path.startswith("file://") else path)
    if not folder.is_dir():
        return [f"data.path: {path!r} does not exist; prepare data with `python -m data_pipeline.prepare` "
                "(or `make tiny-data` for data/tiny) or set data.path=DIR"]
    if not (folder / "manifest.json").is_file():
        return [f"data.path: {path!r} has no manifest.json; is it a folder made by "
                "`python -m data_pipeline.prepare` (or an unfinished one)?"]
    return []


def validate(cfg: TrainConfig) -> list[str]:
    """Problems that types alone do not catch, as `key: what is wrong` lines."""
    problems = list(cfg.model.validate())
    if cfg.precision not in ("bf16", "fp32"):
        problems.append(f"precision: {cfg.precision!r}; expected 'bf16' or 'fp32'")
    if cfg.nonfinite_policy not in ("skip", "stop"):
        problems.append(f"nonfinite_policy: {cfg.nonfinite_policy!r}; expected 'skip' or 'stop'")
    if cfg.nonfinite_skip_limit < 1:
        problems.append(f"nonfinite_skip_limit: {cfg.nonfinite_skip_limit}; expected a positive number of steps")
    if cfg.parallel.pp_schedule not in ("1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"):
        problems.append(f"parallel.pp_schedule: {cfg.parallel.pp_schedule!r}; expected 1f1b, interleaved_1f1b, gpipe or zero_bubble")
    if cfg.schedule.warmup_steps > cfg.schedule.max_steps:
        problems.append("schedule.warmup_steps: larger than schedule.max_steps")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas: {cfg.optim.betas}; expected two numbers")
    for key, value in (("data.seq_len", cfg.data.seq_len), ("data.global_batch_size", cfg.data.global_batch_size),
                       ("data.micro_batch_size", cfg.data.micro_batch_size), ("schedule.max_steps", cfg.schedule.max_steps)):
        if value <= 0:
            problems.append(f"{key}: {value}; expected a positive number")
    return problems + _range_problems(cfg)


def _range_problems(cfg: TrainConfig) -> list[str]:
    """Numbers outside the range where they mean something (a negative lr trains uphill)."""
    opt, sched = cfg.optim, cfg.schedule
    checks = [("optim.lr", opt.lr, opt.lr > 0, "a positive learning rate"),
              ("optim.eps", opt.eps, opt.eps > 0, "a positive number"),
              ("optim.weight_decay", opt.weight_decay, opt.weight_decay >= 0, "0 or more"),
              ("optim.grad_clip", opt.grad_clip, opt.grad_clip >= 0, "0 (off) or a positive norm"),
              ("schedule.min_lr", sched.min_lr, sched.min_lr >= 0, "0 or more"),
              ("schedule.warmup_init_lr", sched.warmup_init_lr, sched.warmup_init_lr >= 0, "0 or more"),
              ("schedule.warmup_steps", sched.warmup_steps, sched.warmup_steps >= 0, "0 or more"),
              ("data.num_workers", cfg.data.num_workers, cfg.data.num_workers >= 0, "0 or more"),
              ("logging.log_interval", cfg.logging.log_interval, cfg.logging.log_interval > 0, "a positive number")]
    checks += [(f"optim.betas[{i}]", b, 0 <= b < 1, "a number in [0, 1)") for i, b in enumerate(opt.betas)]
    return [f"{key}: {value}; expected {expected}" for key, value, ok, expected in checks if not ok]


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into the run folder and every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
