"""Run configuration: pydantic sections, YAML loading, ``key=value`` overrides and up-front validation.

Every key is optional (the defaults are ``configs/default.yaml``); an unknown key or a bad value stops
the run before any work with a :class:`ConfigError` naming the key and what it accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
CHUNK_BYTES = 2 * 2**20  # target size of one uncompressed scan chunk when data.tile is null (stated once)
# `auto` network size, from the raw cube's mean counts per pattern: below LOW_COUNTS the narrower network
# with the shorter warm-up won on three simulated materials at doses 20 and 50 (and on MoS2 at 70), the wider one
# at 100 and 500 (README, Quality: "Network size from the counts per pattern"); the wider one trained on twice
# the samples of a small scan won at 100 and 500 on three materials (README, Quality: "Twice the samples")
LOW_COUNTS = 85.0
AUTO = {("model", "base_width"): (16, 24), ("train", "warmup_epochs"): (2, 4),
        ("train", "min_samples"): (30000, 60000)}  # (below LOW_COUNTS, at or above)
Auto = Literal["auto"]
AUTO_RULE = (f"auto: {', '.join(f'{k} {v[0]}' for (_, k), v in AUTO.items())} below {LOW_COUNTS:g} counts per "
             f"pattern, else {', '.join(str(v[1]) for v in AUTO.values())}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    # scan tile edge: the one grid of training tiles, inference tiles and output chunks; None: the input's
    # chunking when it holds whole patterns, else chunks of about CHUNK_BYTES
    tile: int | None = Field(None, ge=1)
    borders: Literal["reflect", "copy"] = "reflect"  # reflect: every position is a sample; copy: reference
    shuffle_tiles: int = Field(4, ge=1)  # tiles mixed in the per-worker shuffle buffer (bench memory: 8 grew it)
    num_workers: int = Field(2, ge=0)  # loader worker processes per device
    cache_chunks: int = Field(12, ge=1)  # decoded chunks cached per worker (halo reads touch neighbour chunks)
    prefetch_factor: int = Field(1, ge=1)  # tile groups (each many batches) prefetched per worker


def _int_or_auto(v: Any, least: int) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= least):
        return v
    raise ValueError(f"must be an integer >= {least} or auto; got {v!r}")


class ModelConfig(Section):
    base_width: int | Auto = "auto"  # widths w, 2w, ... 16w; auto: by the counts per pattern (LOW_COUNTS)
    depth: int = Field(4, ge=1, le=8)
    head: Literal["square", "mean_exp"] = "square"  # square: the reference; mean_exp: mean pattern x exp(net)
    mean_channel: bool = False  # one more input: the mean pattern (log level), where on the detector a pixel is
    window: Literal[3, 5] = 3  # the blind spot's neighbourhood: 3 x 3 (8 neighbours, the reference) or 5 x 5 (24)
    # 0: the blind spot (the reference). p > 0: one more input, the centre pattern's own counts, trained by
    # Poisson thinning (input a binomial p-share of the centre's counts / p, target the rest / (1 - p)); inference
    # gives it all the centre's counts
    centre: float = Field(0.0, ge=0, lt=1)

    @field_validator("base_width", mode="before")
    @classmethod
    def _width(cls, v: Any) -> Any:
        return _int_or_auto(v, 1)

    @property
    def halo(self) -> int:
        """Scan positions each tile borrows from its neighbours on every side."""
        return self.window // 2


class TrainConfig(Section):
    cycles: int = Field(1, ge=1)  # reference: 10; one long cycle measured better (README, Quality)
    epochs: int = Field(15, ge=1)
    # at least this many samples per cycle: a small scan gets more epochs (a 32 x 32 scan's 15 epochs are
    # 480 optimiser steps, too few to train the network; a 256 x 256 scan's are 30,000); auto: by LOW_COUNTS
    min_samples: int | Auto = "auto"
    # the most epochs train.min_samples may lengthen a cycle to (None: no limit); train.epochs itself is kept.
    # A small scan seen many times is learned by heart, its noise too (README, Quality: passes over a small scan)
    max_epochs: int | None = Field(60, ge=1)
    warmup_epochs: int | Auto = "auto"  # z-normalised MSE epochs before the Poisson loss; auto: by LOW_COUNTS
    batch_size: int = Field(32, ge=1)  # per device; the global batch is batch_size x world size
    lr: float = Field(1e-3, gt=0)  # Adam learning rate, applied as is whatever the world size
    # constant: lr throughout (reference); cosine: lr through the warm-up, then down to lr / 20 by the cycle's end
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # the network used is an exponential moving average of the Poisson phase's weights with this decay per
    # optimiser step (0: the last step's weights, the reference)
    ema: float = Field(0.0, ge=0, lt=1)
    # the network used is the mean of the outputs of the networks at the end of the last this many Poisson
    # epochs (1: the last epoch's, the reference); their counts scatter from epoch to epoch (README, Quality)
    average_epochs: int = Field(4, ge=1, le=32)
    # epochs between two of those networks, counted back from the last (1: consecutive epochs); auto: enough that
    # they are AVERAGE_STEPS optimiser steps apart (on a small scan an epoch is a few dozen steps), as far as the
    # Poisson phase allows. Measured on one case only, so not the default yet (README, Quality: spacing)
    average_every: int | Auto = 1
    # this fraction of the probe positions (at most 4,096) are never targets; the network's Poisson loss on them
    # after each Poisson epoch picks which epochs' networks are used (the average_epochs lowest; 0: the last ones).
    # Off by default: it measures how the network does on positions it never fitted, not on the cube it denoises
    # (README, Quality: held-out positions)
    holdout: float = Field(0.0, ge=0, le=0.25)
    # clip each step's gradient to this global norm (Lightning's gradient_clip_val; 0: no clipping)
    grad_clip: float = Field(0.0, ge=0)
    mean_weight: float = Field(0.0, ge=0)  # reference: 0.02 (weight of the per-pattern mean MSE)
    sum_weight: float = Field(0.0, ge=0)  # reference: 0.01 (weight of the per-pattern sum MSE)
    target: Literal["mix", "raw"] = "mix"  # what the network learns to predict in each cycle
    relative_weight: float = Field(0.0, ge=0, le=1)  # Poisson loss per pixel x (mean / pixel's mean) ** this
    # each batch moved by a random flip or transpose of the scan window: none (the reference); scan (the
    # neighbours permuted only); joint (the patterns flipped with them: scan and detector axes aligned)
    augment: Literal["none", "scan", "joint"] = "none"
    match_counts: bool = True  # scale the output to the targets' counts before the first Poisson step (ref: off)
    seed: int = 0
    # networks trained side by side from seeds seed, seed + 1, ...: inference averages their outputs (each one's
    # train.average_epochs networks); costs this many times the training and inference (README, Quality: ensembles)
    ensemble: int = Field(1, ge=1, le=16)
    # K > 1: cross-fitting. The probe positions are split at random into K folds; network k never has fold k's
    # positions as targets and is the only one that predicts them, so no output depends on its own position's
    # counts through training either (the fusion's SURE assumes it). Same training time: each network fits
    # (K - 1) / K of the targets (README, Quality: cross-fitting)
    crossfit: int = Field(1, ge=1, le=8)

    @field_validator("warmup_epochs", "min_samples", mode="before")
    @classmethod
    def _warmup(cls, v: Any) -> Any:
        return _int_or_auto(v, 0)

    @field_validator("average_every", mode="before")
    @classmethod
    def _every(cls, v: Any) -> Any:
        return _int_or_auto(v, 1)


class HardwareConfig(Section):
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = Field(1, ge=1)  # per node
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true", "fsdp"] = "auto"
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    compile: bool = False
    channels_last: bool = True

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML reads 32 as a number


class InferenceConfig(Section):
    batch_size: int = Field(64, ge=1)


class OutputConfig(Section):
    keep_cycles: Literal["all", "last"] = "all"
    final: Literal["last", "mean"] = "last"  # final cube: last cycle, or mean of all cycles
    calibrate: bool = False  # scale the final cube per detector pixel so its mean pattern is the raw one
    fuse: bool = True  # fuse the final cube with the raw counts over the scan (stemdist.run.fusion)
    fuse_sigma: float | None = Field(None, ge=0, le=16)  # scan sigma in probe positions; null: by SURE
    # how SURE chooses the fusion: one width from the raw bright-field image, or widths and weights per
    # detector region from each region's raw and network images (stemdist.run.fusion)
    fuse_by: Literal["bright_field", "regions"] = "regions"
    fuse_sectors: int = Field(8, ge=1, le=16)  # regions: angular sectors of each ring (centre of mass)
    # regions: each ring's sector harmonics (total, centre-of-mass dipoles, ...) averaged with their Wiener
    # filter over the scan, the fused images' spectrum as the pilot (stemdist.run.fusion.wiener_regions)
    fuse_wiener: bool = True


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.output.final == "mean" and self.output.keep_cycles != "all":
            raise ValueError("output.final: mean averages every cycle, so it needs output.keep_cycles: all")
        fixed = [k for k, on in (("model.head: mean_exp", self.model.head == "mean_exp"),
                                 ("model.mean_channel: true", self.model.mean_channel)) if on]
        if self.train.augment == "joint" and fixed:
            raise ValueError("train.augment: joint flips the patterns, which the fixed mean pattern of "
                             f"{' and '.join(fixed)} does not follow: use train.augment: scan")
        if self.train.ema and self.train.average_epochs > 1:
            raise ValueError(f"train.ema {self.train.ema:g} and train.average_epochs {self.train.average_epochs} are "
                             "two ways to average a cycle's networks: set train.average_epochs: 1 to use the EMA")
        if self.model.centre and self.train.cycles > 1 and self.train.target == "mix":
            raise ValueError(f"model.centre {self.model.centre:g} thins the targets' counts, but with train.cycles "
                             f"{self.train.cycles} and train.target: mix every cycle after the first trains on blends, "
                             "which are not counts: set train.target: raw or train.cycles: 1")
        if self.train.crossfit > 1 and (self.train.ensemble > 1 or self.train.holdout):
            other = "train.ensemble" if self.train.ensemble > 1 else "train.holdout"
            raise ValueError(f"train.crossfit {self.train.crossfit} trains one network per fold of the positions; "
                             f"it does not combine with {other}: set one of them")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve_auto(config: Config, mean_counts: float) -> tuple[Config, str]:
    """``config`` with every ``auto`` size set from the raw cube's mean counts per pattern (see AUTO), and a
    sentence for the run's log ("" when nothing was ``auto``)."""
    low = mean_counts < LOW_COUNTS
    chosen = {(section, key): values[0 if low else 1] for (section, key), values in AUTO.items()
              if getattr(getattr(config, section), key) == "auto"}
    if not chosen:
        return config, ""
    updates: dict[str, dict[str, Any]] = {}
    for (section, key), value in chosen.items():
        updates.setdefault(section, {})[key] = value
    said = ", ".join(f"{section}.{key} {value}" for (section, key), value in chosen.items())
    return apply(config, updates, "auto"), (f"{said} (auto: {mean_counts:.4g} counts per pattern, "
                                            f"{'below' if low else 'at or above'} {LOW_COUNTS:g})")


SECTIONS = tuple(Config.model_fields)
RETIRED = {"output": ("progress",)}  # keys of earlier versions, ignored where they are given


SHORTCUTS = {  # CLI flag / API keyword -> config key
    "cycles": "train.cycles",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "accelerator": "hardware.accelerator",
    "devices": "hardware.devices",
    "num_nodes": "hardware.num_nodes",
}


def _message(err: dict, source: str) -> str:
    """One line for one pydantic error, naming the key and what it accepts."""
    loc = [str(p) for p in err["loc"]]
    key, value, kind, ctx = ".".join(loc), err.get("input"), err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"{source}: unknown section {loc[0]!r} (known: {', '.join(sorted(SECTIONS))})"
        known = ", ".join(sorted(Config.model_fields[loc[0]].annotation.model_fields))
        return f"{source}: unknown key {key} (known: {known})"
    if kind == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{key} must be one of {allowed}; got {value!r}"
    if kind == "model_type" or kind == "dict_type":
        return f"{source}: section {key!r} must be a mapping of keys"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{key} must be {bounds[kind]} {limit}, got {value}"
    if kind.startswith("int_"):
        return f"{key} must be an integer; got {value!r}"
    if kind.startswith("float_"):
        return f"{key} must be a number; got {value!r}"
    if kind.startswith("bool_"):
        return f"{key} must be true or false; got {value!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def _validated(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors()[0], source)) from None


def merge(*updates: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Nested ``{section: {key: value}}`` updates merged left to right."""
    out: dict[str, dict[str, Any]] = {}
    for u in updates:
        for section, values in u.items():
            if values is not None and not isinstance(values, dict):
                out[section] = values  # let validation name the problem
                continue
            out.setdefault(section, {}).update(values or {})
    return out


def apply(config: Config, updates: dict[str, Any], source: str = "config") -> Config:
    """A new, validated config: ``config`` with nested ``{section: {key: value}}`` updates applied."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(updates).__name__}")
    updates = {k: ({n: x for n, x in v.items() if n not in RETIRED.get(k, ())} if isinstance(v, dict) else v)
               for k, v in updates.items()}
    return _validated(merge(config.to_dict(), {k: v for k, v in updates.items() if v is not None}), source)


def shortcut_overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"epochs": 3}`` (CLI flags, API keywords) as ``{"train": {"epochs": 3, "min_samples": 0}}``: epochs given
    this way are the epochs run (``train.min_samples`` would lengthen them on a small scan; ``--set`` keeps it)."""
    out: dict[str, dict[str, Any]] = {}
    for name, key in SHORTCUTS.items():
        if values.get(name) is not None:
            section, k = key.split(".")
            out.setdefault(section, {})[k] = values[name]
    if values.get("epochs") is not None:
        out["train"]["min_samples"] = 0
    return out


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["train.epochs=3", ...]`` into nested updates (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        section, name = key.strip().split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(value) if value else None
    return out


def resolve_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a built-in one (``default``, ``reference``, ``smoke``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {str(name_or_path)!r} not found (built-in configs: {known})")




def load(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file (a path or a built-in name), then overrides; validated."""
    config = Config()
    if path is not None:
        path = resolve_path(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        config = apply(config, data, source=str(path))
    if overrides:
        config = apply(config, overrides, source="override")
    return config
