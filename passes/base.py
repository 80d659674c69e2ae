"""The pass contract: a frozen config dataclass, a kebab-case name, ``requires`` and ``run``.

A pass declares its ``kind``, which tells the pass manager how to judge it:

- ``analysis``: reads the program, writes results into ``program.analyses``, changes nothing
  (the manager checks that the logits are bit-identical);
- ``exact``: changes the program without changing its function (logits within float tolerance,
  or the run fails);
- ``lossy``: changes the function on purpose (the manager records logit SQNR, KL, top-1).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from modelfold.ir.program import Program


class PassError(RuntimeError):
    """A pass could not run."""


class PreconditionError(PassError):
    """A pass's ``requires`` check failed (wrong model, missing analysis, bad ordering)."""


class PostconditionError(PassError):
    """A pass broke its contract (an exact pass changed the logits, an analysis changed weights)."""


@dataclass(frozen=True)
class PassConfig:
    """Base class of pass options. Subclasses are frozen dataclasses with documented defaults.

    Validation goes in ``validate()`` and raises ``ValueError`` naming the option.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; raise ``ValueError`` naming the option and the bad value."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_options(cls, options: dict[str, Any], *, pass_name: str = "") -> PassConfig:
        """Build from raw options (strings from a pipeline string, or YAML values).

        Raises:
            ValueError: unknown option, or a value that does not convert to the option's type.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        where = f"pass '{pass_name}'" if pass_name else cls.__name__
        kwargs = {}
        for key, raw in options.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"{where} has no option '{key}'; options: "
                                 f"{', '.join(fields) or '(none)'}")
            kwargs[name] = _coerce(raw, hints[name], f"{where} option '{key}'")
        return cls(**kwargs)

    @classmethod
    def describe_options(cls) -> list[dict[str, str]]:
        """Option name, type, default and help (the field's ``metadata["help"]``)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append({"name": f.name,
                        "type": _type_name(hints[f.name]), "default": repr(_jsonable(default)),
                        "help": f.metadata.get("help", "")})
        return out


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with a default and a help string (shown by ``modelfold passes``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"help": help})


class Pass:
    """Base class of passes. Subclasses set ``name``, ``config_class``, ``kind`` and ``run``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    kind: ClassVar[str] = "exact"  # "analysis" | "exact" | "lossy"
    summary: ClassVar[str] = ""
    # An exact pass that evaluates the same function in another order (a sum of factors instead
    # of one product) may move the logits by float rounding that grows with their size: the
    # allowed change is ``exact_atol + exact_rtol * max|logits|``.
    exact_rtol: ClassVar[float] = 0.0

    def __init__(self, config: PassConfig | None = None, **options: Any):
        if config is not None and options:
            raise TypeError(f"{self.name}: pass either a config or keyword options, not both")
        if config is None:
            config = self.config_class.from_options(options, pass_name=self.name)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config

    def requires(self, program: Program) -> None:
        """Raise ``PreconditionError`` if the pass cannot run on ``program``."""

    def run(self, program: Program) -> dict[str, Any]:
        """Transform or analyse ``program`` in place; return details for the report.

        A pass that skips part of the model returns them under ``"skipped"`` as
        ``[{"target": path, "reason": why}]``; the report lists every one.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.config.to_dict().items())
        return f"{self.name}{{{opts}}}" if opts else self.name


# -- option coercion ---------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(raw: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(raw, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: bad value {raw!r}")
    if origin is typing.Literal:
        value = raw if not isinstance(raw, str) else raw.strip()
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(str, args))}; got {raw!r}")
        return value
    if origin is tuple:
        items = raw
        if isinstance(raw, str):
            text = raw.strip().removeprefix("[").removesuffix("]").strip()
            items = [t for t in text.replace(";", ",").split(",") if t.strip()] if text else []
        elif not isinstance(raw, (list, tuple)):
            items = [raw]
        elem = args[0] if args else str
        return tuple(_coerce(i, elem, where) for i in items)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _TRUE:
            return True
        if str(raw).lower() in _FALSE:
            return False
        raise ValueError(f"{where} must be true or false; got {raw!r}")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise ValueError(f"{where} must be a number; got {raw!r}")
        try:
            value = hint(raw) if hint is float or isinstance(raw, int) else int(str(raw).strip())
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be {'an integer' if hint is int else 'a number'}; "
                             f"got {raw!r}") from None
        return value
    if hint is str:
        if isinstance(raw, (dict, list)):
            raise ValueError(f"{where} must be a string; got {raw!r}")
        return str(raw).strip()
    return raw


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + \
            (" or none" if type(None) in args else "")
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
