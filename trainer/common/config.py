"""YAML files -> frozen, typed, validated training configs.

A stage's config is a tree of frozen dataclasses whose fields all have defaults. A YAML file
only *overrides* fields (through :func:`streamgen.config.override`, which rejects unknown
keys), then every leaf is type-checked against its annotation and each dataclass validates
its values in ``__post_init__``. So a typo or a bad value raises ``ValueError`` before any
model is built or any clip rendered. This module must never import torch or start work.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from streamgen.config import override
from streamgen.device import parse_device

T = TypeVar("T")


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``: the one validation primitive of stage configs."""
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives, how long it trains and how often it saves."""

    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    max_steps: int = 1000
    # Wall-clock budget: at the first step past it the run checkpoints and finishes normally
    # (then exports), so a schedule with a hard deadline still ends with saved weights.
    max_minutes: float | None = None
    save_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    num_threads: int | None = None  # torch intra-op threads per process; None = torch's default
    # auto: the GPU accelerate gives this process where CUDA is available, else cpu; cpu; cuda; cuda:N
    # (one process only: several processes take one GPU each from `accelerate launch`).
    device: str = "auto"
    # Recompute each DiT block in backward instead of storing its activations (less memory, ~1 more
    # forward of compute; same loss and gradients). The DiT stages honour it; the VAE stage refuses it.
    gradient_checkpointing: bool = False
    # How several processes share the work: ddp (each holds the whole model; gradients all-reduced) or fsdp
    # (the DiT stages shard each trained transformer's parameters, gradients and optimizer state over the
    # processes: FSDP2; needs >= 2 processes). Checkpoints are the same either way.
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"run.name must be a non-empty name, got {self.name!r}")
        check(self.max_steps > 0, f"run.max_steps must be > 0, got {self.max_steps}")
        check(self.max_minutes is None or self.max_minutes > 0, "run.max_minutes must be > 0 or null")
        check(self.save_every > 0, f"run.save_every must be > 0, got {self.save_every}")
        check(self.log_every > 0, f"run.log_every must be > 0, got {self.log_every}")
        check(self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        check(self.num_threads is None or self.num_threads > 0, "run.num_threads must be > 0 or null")
        check(self.parallel in ("ddp", "fsdp"), f"run.parallel must be ddp or fsdp, got {self.parallel!r}")
        try:
            parse_device(self.device)  # syntax only: whether this machine has the device is decided at launch
        except ValueError as exc:
            raise ValueError(f"run.device: {exc}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, linear warmup then a constant or cosine learning rate, gradient clipping, EMA."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip must be > 0 or null")
        check(0 <= self.ema_decay < 1, f"optim.ema_decay must lie in [0, 1), got {self.ema_decay}")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the subset of types our configs use)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, h) for v, h in zip(value, args, strict=True))
    if hint is float:  # YAML writes 1 for 1.0; bool is an int subclass but never a float setting
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _hint_name(hint: Any) -> str:
    """``float`` -> "a float", ``int | None`` -> "int | None" (readable in an error message)."""
    if isinstance(hint, type):
        return f"an {hint.__name__}" if hint.__name__[0] in "aeiou" else f"a {hint.__name__}"
    return "a " + str(hint).replace("typing.", "")


def check_types(cfg: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first field whose value does not match its annotation."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_types(value, prefix=f"{name}.")
        elif not _type_ok(value, hints[f.name]):
            raise ValueError(f"config field {name} = {value!r} ({type(value).__name__}) "
                             f"is not {_hint_name(hints[f.name])}")


# A YAML 1.2 (core schema) decimal number. PyYAML implements YAML 1.1, which reads ``1e-4``, ``-1e-4`` and
# ``-.5`` as *strings* (its floats need a dot and a signed exponent), so such text in a float field is a number
# the user meant; it is converted before the type check instead of being refused as "not a float".
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _accepts_float(hint: Any) -> bool:
    if hint is float:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts_float(h) for h in typing.get_args(hint))
    return False


def _as_number(value: Any, hint: Any) -> Any:
    """``value`` with YAML 1.2 number text turned into a float where ``hint`` takes floats (tuples element-wise)."""
    if isinstance(value, str) and _accepts_float(hint) and _YAML12_FLOAT.fullmatch(value.strip()):
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return [_as_number(v, args[0]) for v in value]
        if len(args) == len(value):
            return [_as_number(v, h) for v, h in zip(value, args, strict=True)]
    return value


def _coerce_numbers(cfg: Any, changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` with number text in float fields parsed (see ``_YAML12_FLOAT``); other values untouched."""
    hints = typing.get_type_hints(type(cfg))
    out: dict[str, Any] = {}
    for key, value in changes.items():
        current = getattr(cfg, key, None)
        if key in hints and dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            out[key] = _coerce_numbers(current, value)
        else:
            out[key] = _as_number(value, hints[key]) if key in hints else value
    return out


def _check_changes(cfg: Any, changes: Mapping[str, Any], prefix: str = "") -> None:
    """Type-check raw override values *before* they reach a dataclass, whose ``__post_init__`` would
    otherwise fail on them with an unhelpful ``TypeError``. Unknown keys are left to ``override``."""
    hints = typing.get_type_hints(type(cfg))
    for key, value in changes.items():
        if key not in hints:
            continue
        current, name = getattr(cfg, key), f"{prefix}{key}"
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"config field {name} must be a mapping of {type(current).__name__} fields, "
                                 f"got {value!r}")
            _check_changes(current, value, prefix=f"{name}.")
        elif not _type_ok(tuple(value) if isinstance(value, list) else value, hints[key]):
            raise ValueError(f"config field {name} = {value!r} ({type(value).__name__}) "
                             f"is not {_hint_name(hints[key])}")


def _coerce_floats(cfg: T) -> T:
    """Turn ints given for float fields (YAML ``lr: 1``) into floats, so the config compares and hashes as floats."""
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _coerce_floats(value)
        elif hints[f.name] in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            changes[f.name] = float(value)
    return dataclasses.replace(cfg, **changes) if changes else cfg  # type: ignore[type-var]


def build_config(cls: type[T], changes: Mapping[str, Any] | None = None) -> T:
    """The defaults of ``cls`` with ``changes`` applied, type-checked and validated.

    Raises ``ValueError`` on an unknown key, a wrongly typed value or a value its dataclass rejects.
    """
    cfg = cls()
    if changes:
        changes = _coerce_numbers(cfg, changes)
        _check_changes(cfg, changes)
        cfg = override(cfg, changes)
    check_types(cfg)
    return _coerce_floats(cfg)


def describe_config(cls: type, prefix: str = "", default: Any = None) -> list[str]:
    """``key.sub: type = default`` for every field of ``cls`` (the ``--help`` epilog of each stage)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    default = cls() if default is None else default
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe_config(type(value), prefix=f"{prefix}{f.name}.", default=value)
        else:
            hint = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            lines.append(f"  {prefix}{f.name}: {hint} = {value!r}")
    return lines


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-4"`` -> ``{"optim": {"lr": "1e-4"}}`` (the value is parsed as YAML; number text that
    YAML 1.1 leaves a string becomes a float where the field is a float, in :func:`build_config`)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from exc
    for part in reversed(key.strip().split(".")):
        check(bool(part), f"override {text!r} has an empty key part")
        value = {part: value}
    return value


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins); used to stack ``--set`` overrides on a YAML file."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Parse YAML ``path`` (may be ``None``) plus ``key.sub=value`` ``overrides`` into a validated ``cls``.

    An error names where the offending value came from: the YAML file, or the ``--set key=value``
    that introduced it (see :func:`_origin`).
    """
    layers: list[tuple[str, dict[str, Any]]] = []  # (where it came from, what it sets), in application order
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ValueError(f"config file {path} must hold a mapping at the top level, got {type(loaded).__name__}")
        layers.append((str(path), dict(loaded or {})))
    for text in overrides:
        try:
            layers.append((f"--set {text}", parse_override(text)))
        except ValueError as exc:
            raise ValueError(f"--set {text}: {exc}") from exc
    try:
        return build_config(cls, _stack(layers))
    except ValueError as exc:
        raise ValueError(f"{_origin(cls, layers, str(exc))}: {exc}") from exc


def _stack(layers: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for _, layer in layers:
        data = merge(data, layer)
    return data


def _origin(cls: type, layers: Sequence[tuple[str, dict[str, Any]]], error: str) -> str:
    """The layer (YAML file or ``--set``) an error comes from: the earliest one after which every stack of
    layers fails with this same message. Validation messages name a field and its value, so this is the
    layer that set the offending value (or, for a rule between fields, the one that completed the conflict).
    Building a config is cheap and side-effect free, so replaying the layers costs nothing that matters."""
    if not layers:
        return "config"
    culprit = len(layers) - 1
    for k in range(len(layers) - 2, -1, -1):
        try:
            build_config(cls, _stack(layers[:k + 1]))
        except ValueError as exc:
            if str(exc) == error:
                culprit = k
                continue
        break
    return layers[culprit][0]
