"""Options as frozen dataclasses: one machinery for passes, exports and training runs.

A set of options is a frozen dataclass whose fields are declared with ``option(default, help)``;
``from_options`` builds it from raw values (strings from a pipeline string or the command line,
YAML values) by converting each to its field's type, and ``validate`` checks the values. Errors
are ``OptionError`` naming the option and the bad value. A field's type may be any class with a
``from_option(raw, where)`` classmethod (e.g. ``modelfold.ir.targets.TargetSpec``): it converts
and validates its own values, so they fail when the options are parsed, before any model loads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from modelfold.errors import OptionError


@dataclass(frozen=True)
class Options:
    """Base class of option sets. Subclasses are frozen dataclasses with documented defaults.

    Validation goes in ``validate()`` and raises ``OptionError`` naming the option.
    """

    # How errors name the owner of the options ("pass 'quantize'", "export").
    label: ClassVar[str] = ""
    # Options listed after the others in to_dict / pipeline strings (shared base options).
    trailing: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Values of option types that convert themselves (TargetSpec) are normalised, so that
        # Config(targets=("q_proj",)) is checked like the pipeline string targets=[q_proj].
        for name, hint in typing.get_type_hints(type(self)).items():
            if isinstance(hint, type) and hasattr(hint, "from_option") and \
                    not isinstance(getattr(self, name, None), hint):
                where = f"{self.label or type(self).__name__} option '{name}'"
                object.__setattr__(self, name, hint.from_option(getattr(self, name), where))
        self.validate()

    def validate(self) -> None:
        """Check option values; raise ``OptionError`` naming the option and the bad value."""

    def to_dict(self) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(self)]
        names.sort(key=lambda n: n in self.trailing)  # stable: the declared order otherwise
        return {n: _jsonable(getattr(self, n)) for n in names}

    @classmethod
    def from_options(cls, options: dict[str, Any], *, where: str = "") -> Options:
        """Build from raw options (strings from a pipeline string, or YAML values).

        Raises:
            OptionError: unknown option, or a value that does not convert to the option's type.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        where = where or cls.label or cls.__name__
        kwargs = {}
        for key, raw in options.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise OptionError(f"{where} has no option '{key}'; options: "
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


# -- option coercion ---------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(raw: Any, hint: Any, where: str) -> Any:
    if isinstance(hint, type) and hasattr(hint, "from_option"):
        return hint.from_option(raw, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(raw, arg, where)
            except OptionError as exc:
                errors.append(str(exc))
        raise OptionError(errors[0] if errors else f"{where}: bad value {raw!r}")
    if origin is typing.Literal:
        value = raw if not isinstance(raw, str) else raw.strip()
        if value not in args:
            raise OptionError(f"{where} must be one of {', '.join(map(str, args))}; got {raw!r}")
        return value
    if origin is tuple:
        items = raw
        if isinstance(raw, str):
            if raw.strip().startswith("[") != raw.strip().endswith("]"):
                raise OptionError(f"{where}: unbalanced brackets in {raw!r}")
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
        raise OptionError(f"{where} must be true or false; got {raw!r}")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise OptionError(f"{where} must be a number; got {raw!r}")
        try:
            value = hint(raw) if hint is float or isinstance(raw, int) else int(str(raw).strip())
        except (TypeError, ValueError):
            raise OptionError(f"{where} must be {'an integer' if hint is int else 'a number'}; "
                             f"got {raw!r}") from None
        return value
    if hint is str:
        if isinstance(raw, (dict, list)):
            raise OptionError(f"{where} must be a string; got {raw!r}")
        return str(raw).strip()
    return raw


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and hasattr(hint, "type_name"):
        return hint.type_name
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
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


__all__ = ["Options", "format_value", "option"]
