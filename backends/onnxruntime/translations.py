"""Registry of ONNX translations for custom (dialect) ops.

`torch.onnx.export(..., dynamo=True)` lowers ATen ops by itself, but a `torch.library.custom_op`
(e.g. `torch.ops.modelfold.quant_linear`) reaches the exporter as one opaque node and needs an
onnxscript function that says how to build it in ONNX. Dialect modules register that function here,
next to the op's definition:

    from modelfold.backends.onnxruntime.translations import register_translation

    @onnxscript.script(opset=...)
    def _quant_linear_onnx(x, packed, scales, zero_points, ...): ...

    register_translation(torch.ops.modelfold.quant_linear, _quant_linear_onnx)

`export_onnx` always passes `translation_table()` as `custom_translation_table=`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# OpOverload -> onnxscript function (or a list of overloads for the dispatcher to choose from).
_TRANSLATIONS: dict[torch._ops.OpOverload, Callable | list[Callable]] = {}


def _as_overload(op: object) -> torch._ops.OpOverload:
    """Normalizes `torch.ops.ns.name` (a packet) to its `.default` overload."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        if "default" not in op.overloads():
            raise ValueError(
                f"op {op} has no 'default' overload; register each overload explicitly "
                f"(one of {op.overloads()})"
            )
        return op.default
    if isinstance(op, torch._ops.OpOverload):
        return op
    raise TypeError(f"op must be a torch op such as torch.ops.modelfold.quant_linear(.default), got {op!r}")


def register_translation(
    op: torch._ops.OpOverload | torch._ops.OpOverloadPacket,
    fn: Callable | list[Callable],
    *,
    replace: bool = False,
) -> None:
    """Registers the ONNX translation of a custom op.

    Args:
        op: The op, as `torch.ops.<ns>.<name>` (means its `.default` overload) or an overload.
        fn: An onnxscript function (`@onnxscript.script()` or a traced function taking and returning
            onnxscript values), or a list of them for the exporter's dispatcher to choose from.
        replace: Allow replacing an existing registration (otherwise that is an error, because two
            modules silently fighting over one op produces wrong artifacts).

    Raises:
        ValueError: `op` is already registered and `replace` is False.
    """
    overload = _as_overload(op)
    if not callable(fn) and not (isinstance(fn, list) and all(callable(f) for f in fn)):
        raise TypeError(f"fn must be a callable or a list of callables, got {fn!r}")
    if overload in _TRANSLATIONS and not replace:
        raise ValueError(
            f"an ONNX translation for {overload} is already registered; pass replace=True to override it"
        )
    _TRANSLATIONS[overload] = fn


def ensure_registered(translations: dict[str, Callable]) -> None:
    """Registers ``{name: fn}`` for the dialect ops ``torch.ops.modelfold.<name>`` unless that
    exact ``fn`` already is (the built-in lowerings call this on import, and again after an
    `unregister_translation`).

    Raises:
        ValueError: Another translation is already registered for one of the ops.
    """
    for name, fn in translations.items():
        overload = getattr(torch.ops.modelfold, name)
        if registered_translation(overload) is not fn:
            register_translation(overload, fn)


def registered_translation(
    op: torch._ops.OpOverload | torch._ops.OpOverloadPacket,
) -> Callable | list[Callable] | None:
    """Returns the translation registered for `op`, or None."""
    return _TRANSLATIONS.get(_as_overload(op))


def unregister_translation(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> None:
    """Removes the translation of `op` (no-op when none is registered). Mostly for tests."""
    _TRANSLATIONS.pop(_as_overload(op), None)


def translation_table() -> dict[torch._ops.OpOverload, Callable | list[Callable]]:
    """Returns a copy of the registry, in the form `custom_translation_table=` expects.

    Every `*_lowering.py` module of this package registers the translations of its dialect's ops
    when it is imported, which this ensures (`load_lowerings`).
    """
    load_lowerings()
    return dict(_TRANSLATIONS)


def load_lowerings() -> None:
    """Imports every `*_lowering` module of the ONNX Runtime backend (and the modules other
    packages declare in the "modelfold.onnxruntime_lowerings" entry-point group)."""
    # Imported on first use, not at the top: those modules import this registry.
    from modelfold.discovery import import_all

    import_all("modelfold.backends.onnxruntime", suffix="_lowering",
               group="modelfold.onnxruntime_lowerings")
