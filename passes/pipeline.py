"""Pipeline strings (``name{k=v,...},name2``) and YAML recipes -> lists of configured passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelfold.errors import ModelfoldError
from modelfold.passes.base import Pass
from modelfold.passes.registry import get_pass


class PipelineSyntaxError(ModelfoldError, ValueError):
    """A pipeline string or recipe is malformed."""


# Top-level keys of a YAML recipe ("description" is free text for people).
RECIPE_KEYS = {"passes", "description"}


def parse_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split ``"a{k=v,l=[1,2]},b"`` into ``[("a", {"k": "v", "l": "[1,2]"}), ("b", {})]``.

    Raises:
        PipelineSyntaxError: an empty element (``a,,b``), a stray or unclosed brace or bracket,
            an option that is not ``key=value``.
    """
    items: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \n\t":
            i += 1
        if i >= n:
            break
        if text[i] == ",":
            raise PipelineSyntaxError(f"empty pipeline element at position {i} in {text!r}: "
                                      "passes are separated by exactly one ','")
        start = i
        while i < n and text[i] not in "{,":
            if text[i] in "}=[]":
                raise PipelineSyntaxError(f"unexpected '{text[i]}' at position {i} in pipeline "
                                          f"{text!r}")
            i += 1
        name = text[start:i].strip()
        if not name:
            raise PipelineSyntaxError(f"missing pass name at position {start} in {text!r}")
        options: dict[str, str] = {}
        if i < n and text[i] == "{":
            close = _matching_brace(text, i)
            options = _parse_options(text[i + 1:close], name)
            i = close + 1
            while i < n and text[i] in " \n\t":
                i += 1
            if i < n and text[i] != ",":
                raise PipelineSyntaxError(f"expected ',' after the options of '{name}' at position "
                                          f"{i} in {text!r}")
        items.append((name, options))
        if i < n and text[i] == ",":
            i += 1
            if not text[i:].strip():
                raise PipelineSyntaxError(f"the pipeline {text!r} ends with ','")
    if not items:
        raise PipelineSyntaxError("empty pipeline: name at least one pass, e.g. 'drop-layers{count=2}'")
    return items


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise PipelineSyntaxError(f"unclosed '{{' at position {start} in {text!r}")


def _parse_options(body: str, name: str) -> dict[str, str]:
    options: dict[str, str] = {}
    depth, current, parts = 0, "", []
    for ch in body:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise PipelineSyntaxError(f"unbalanced ']' in the options of pass '{name}': "
                                          f"{{{body}}}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise PipelineSyntaxError(f"unclosed '[' in the options of pass '{name}': {{{body}}}")
    parts.append(current)
    for part in (p.strip() for p in parts):
        if not part:
            if parts != [""]:
                raise PipelineSyntaxError(f"empty option in the options of pass '{name}': "
                                          f"{{{body}}}")
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise PipelineSyntaxError(f"option '{part}' of pass '{name}' must be key=value")
        if key.strip() in options:
            raise PipelineSyntaxError(f"option '{key.strip()}' of pass '{name}' given twice")
        options[key.strip()] = value.strip()
    return options


def build_pipeline(spec: str | list[Any] | Path) -> list[Pass]:
    """Configured passes from a pipeline string, a list (of strings, dicts or passes) or a recipe.

    A string naming an existing ``.yaml``/``.yml`` file is read as a recipe.
    """
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().endswith((".yaml", ".yml"))):
        return load_recipe(Path(spec))
    if isinstance(spec, str):
        return [get_pass(name)(**options) for name, options in parse_pipeline(spec)]
    passes: list[Pass] = []
    for item in spec:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(build_pipeline(item))
        elif isinstance(item, dict):
            passes.append(_pass_from_mapping(item))
        else:
            raise TypeError(f"cannot build a pass from {type(item).__name__}: use a Pass, a "
                            "pipeline string or a {name: {options}} mapping")
    return passes


def _pass_from_mapping(item: dict[str, Any]) -> Pass:
    if "name" in item:  # {name: drop-layers, count: 4}
        options = {k: v for k, v in item.items() if k != "name"}
        return get_pass(str(item["name"]))(**options)
    if len(item) == 1:  # {drop-layers: {count: 4}}
        (name, options), = item.items()
        if options is not None and not isinstance(options, dict):
            raise PipelineSyntaxError(f"options of pass '{name}' must be a mapping, got {options!r}")
        return get_pass(str(name))(**(options or {}))
    raise PipelineSyntaxError(f"a recipe entry must be {{name: {{options}}}} or have a 'name' key; "
                              f"got {item!r}")


def load_recipe(path: Path) -> list[Pass]:
    """Read a YAML recipe: ``passes:`` followed by a list of ``{pass-name: {options}}``."""
    import yaml

    if not path.is_file():
        raise PipelineSyntaxError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PipelineSyntaxError(f"recipe '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise PipelineSyntaxError(f"recipe '{path}' must be a mapping with a 'passes' list")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise PipelineSyntaxError(f"recipe '{path}' has unknown top-level key(s) "
                                  f"{', '.join(map(repr, unknown))}; a recipe has "
                                  f"{', '.join(sorted(RECIPE_KEYS))}")
    if not data["passes"]:
        raise PipelineSyntaxError(f"recipe '{path}' has an empty 'passes' list")
    return build_pipeline(data["passes"])


def pipeline_string(passes: list[Pass]) -> str:
    """The canonical pipeline string that rebuilds ``passes`` (quotable in a bug report)."""
    return ",".join(repr(p) for p in passes)
