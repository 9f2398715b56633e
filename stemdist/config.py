"""Run configuration: typed sections, YAML loading, ``key=value`` overrides and up-front validation."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    tile: int | None = None  # scan tile (= Zarr chunk) edge; None: the input's chunks, or ~4 MB chunks
    borders: Literal["reflect", "copy"] = "reflect"  # reflect: every position is a sample; copy: reference
    shuffle_tiles: int = 8  # tiles mixed in the per-worker shuffle buffer
    num_workers: int = 2  # loader worker processes per device
    cache_chunks: int = 24  # decoded chunks cached per worker (halo reads touch neighbour chunks)
    prefetch_factor: int = 1  # tile groups (each many batches) prefetched per worker


@dataclass
class ModelConfig:
    base_width: int = 24
    depth: int = 4


@dataclass
class TrainConfig:
    cycles: int = 1  # reference: 10; one long cycle measured better (README, Quality)
    epochs: int = 15
    warmup_epochs: int = 4
    batch_size: int = 32  # per device; the global batch is batch_size x world size
    lr: float = 1e-3  # Adam learning rate, applied as is whatever the world size
    mean_weight: float = 0.0  # reference: 0.02 (weight of the per-pattern mean MSE)
    sum_weight: float = 0.0  # reference: 0.01 (weight of the per-pattern sum MSE)
    target: Literal["mix", "raw"] = "mix"  # what the network learns to predict in each cycle
    seed: int = 0


@dataclass
class HardwareConfig:
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = 1  # per node
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    compile: bool = False
    channels_last: bool = True


@dataclass
class InferenceConfig:
    batch_size: int = 64


@dataclass
class OutputConfig:
    keep_cycles: Literal["all", "last"] = "all"
    final: Literal["last", "mean"] = "last"  # final cube: last cycle, or mean of all cycles
    calibrate: bool = False  # scale the final cube per detector pixel so its mean pattern is the raw one
    fuse: bool = True  # fuse the final cube with the raw counts over the scan (stemdist.fusion)
    fuse_sigma: float | None = None  # its scan sigma in probe positions; null: chosen by SURE from the data
    progress: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> Config:
        """Check values that types alone cannot; raise ConfigError naming the key."""
        positive = {
            "data.shuffle_tiles": self.data.shuffle_tiles,
            "data.cache_chunks": self.data.cache_chunks,
            "data.prefetch_factor": self.data.prefetch_factor,
            "model.base_width": self.model.base_width,
            "model.depth": self.model.depth,
            "train.cycles": self.train.cycles,
            "train.epochs": self.train.epochs,
            "train.batch_size": self.train.batch_size,
            "hardware.devices": self.hardware.devices,
            "hardware.num_nodes": self.hardware.num_nodes,
            "inference.batch_size": self.inference.batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.data.tile is not None and self.data.tile < 1:
            raise ConfigError(f"data.tile must be >= 1 or null, got {self.data.tile}")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        if self.model.depth > 8:
            raise ConfigError(f"model.depth must be <= 8, got {self.model.depth}")
        if not 0 <= self.train.warmup_epochs:
            raise ConfigError(f"train.warmup_epochs must be >= 0, got {self.train.warmup_epochs}")
        if not self.train.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.train.lr}")
        if self.output.final == "mean" and self.output.keep_cycles != "all":
            raise ConfigError("output.final: mean averages every cycle, so it needs output.keep_cycles: all")
        if self.output.fuse_sigma is not None and not 0 <= self.output.fuse_sigma <= 16:
            raise ConfigError(f"output.fuse_sigma must be in [0, 16] probe positions or null, "
                              f"got {self.output.fuse_sigma}")
        for key in ("mean_weight", "sum_weight"):
            if getattr(self.train, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self.train, key)}")
        return self


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to type ``tp`` (from a dataclass annotation) or raise ConfigError."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if str(value) in [str(a) for a in allowed]:
            return next(a for a in allowed if str(a) == str(value))
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer; got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number; got {value!r}") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def apply(config: Config, updates: dict[str, Any], source: str = "config") -> Config:
    """Return a copy of ``config`` with nested ``{section: {key: value}}`` updates applied."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(updates).__name__}")
    config = dataclasses.replace(config, **{f.name: dataclasses.replace(getattr(config, f.name))
                                            for f in fields(Config)})
    sections = {f.name for f in fields(Config)}
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(sorted(sections))})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys")
        obj = getattr(config, section)
        types = _section_types(type(obj))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key} (known: {', '.join(sorted(types))})")
            setattr(obj, key, _coerce(f"{section}.{key}", value, types[key]))
    return config


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
    if path.exists():
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
    return config.validate()
