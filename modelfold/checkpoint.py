"""Checkpoints of transformed models: reload a quantized (or otherwise rewritten) model without
re-running its passes.

A checkpoint is a folder:

    config.json                  the Hugging Face config of the transformed model
    model.safetensors            every persistent tensor, each unique tensor once (tied ones too)
    modelfold_checkpoint.json    format version, base architecture, pipeline and pass log, the
                                 module manifest (every replaced module: path, type, constructor
                                 facts), the aliases of tied tensors, file sizes and sha256
    tokenizer files, generation_config.json   when the model has them

Loading builds the model from ``config.json`` with weight initialisation skipped, swaps in empty
modules per the manifest (a wrapper before the modules inside it), re-ties the aliases so that
shared tensors are one object again, and fills every tensor from the file, strictly: a missing,
unexpected or mis-shaped tensor is a ``CheckpointError`` naming it. ``save_checkpoint`` runs the
same rebuild on the meta device first, so a checkpoint that would not load is never written.

The dialect modules that define layer types register how they are described and rebuilt, next
to the class (``modelfold.ir.module_types.register_module_type``, re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelfold.assets import (
    AssetError,
    atomic_output,
    check_output,
    output_lock,
    refuse_remote_code,
)
from modelfold.ir.lora import lora_layers
from modelfold.ir.module_types import (
    ModuleType,
    StandardFormatError,
    rebuild_hooks,
    register_module_type,
    registered_module_types,
    standard_formats,
    type_for_class,
    type_named,
)

if TYPE_CHECKING:
    from modelfold import TransformResult
    from modelfold.ir.program import Program

MANIFEST = "modelfold_checkpoint.json"
WEIGHTS = "model.safetensors"
FORMAT = "modelfold-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(AssetError):
    """A checkpoint cannot be written, or a folder is not a loadable checkpoint.

    A subclass of ``AssetError``: every caller of ``load_model`` (the CLI included) reports it
    as a bad model directory.
    """


def _type_of_entry(entry: dict[str, Any]) -> ModuleType:
    """The registered type of a manifest entry, importing its defining modelfold module if needed."""
    mtype = type_named(str(entry.get("type")), str(entry.get("python_module", "")))
    if mtype is None:
        known = registered_module_types()
        raise CheckpointError(
            f"module '{entry.get('path')}' has type '{entry.get('type')}', which this modelfold "
            f"cannot rebuild (known checkpoint module types: {', '.join(known)}); the checkpoint "
            "was written by a version with that type, or its module was not imported")
    return mtype


# -- saving ------------------------------------------------------------------------------------
def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a modelfold checkpoint folder (has ``modelfold_checkpoint.json``)."""
    return (Path(path) / MANIFEST).is_file()


SAVE_FORMATS = ("auto", "modelfold", "transformers")


def save_checkpoint(program_or_result: TransformResult | Program | nn.Module,
                    out_dir: str | Path, *, overwrite: bool = False,
                    format: str = "auto") -> dict[str, Any]:
    """Write a transformed model as a reloadable checkpoint folder; returns its manifest.

    The folder is written under a temporary name and moved into place only when complete.

    Args:
        program_or_result: a ``TransformResult``, a ``Program`` or a Hugging Face model.
        out_dir: the folder to create.
        overwrite: replace an existing checkpoint (or empty folder) at ``out_dir``.
        format: ``modelfold`` (this module's format); ``transformers``: a standard transformers
            checkpoint that plain ``transformers`` loads (a dense-to-MoE conversion as Mixtral /
            Qwen2-MoE), an error when none computes what the model does; ``auto``: the standard
            one where it exists, else modelfold's.

    Raises:
        CheckpointError: ``out_dir`` exists (and may not be replaced), the model is not a Hugging
            Face model with real (non-meta) tensors, or it holds a module type no checkpoint rule
            describes.
    """
    from safetensors.torch import save_file

    if format not in SAVE_FORMATS:
        raise CheckpointError(f"checkpoint format must be one of {', '.join(SAVE_FORMATS)}; "
                              f"got {format!r}")
    program, pipeline = _program_and_pipeline(program_or_result)
    module = program.module
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise CheckpointError(f"cannot checkpoint a {type(module).__name__}: only Hugging Face "
                              "models (with a .config) can be rebuilt from config.json")
    out = Path(out_dir)
    check_destination(out, overwrite)
    if format != "modelfold":
        standard, why = _standard(module)
        if standard is not None:
            return _save_standard(program, pipeline, out, *standard)
        if format == "transformers":
            raise CheckpointError("no standard transformers format for this model: "
                                  f"{why or 'it has no modules a standard format describes'}; "
                                  "save it in modelfold's format (format='modelfold')")
    tensors, aliases = _unique_tensors(module)
    manifest = manifest_for(program, pipeline, _tensor_specs(tensors), aliases)
    # Dry run: rebuild on the meta device exactly as load_checkpoint will, and compare.
    rebuilt = _rebuild(config, manifest, device="meta")
    _check_structure(module, rebuilt)
    _check_tensors(_canonical_state(rebuilt, aliases), _tensor_specs(tensors), when="save")

    with output_lock(out), atomic_output(out) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        saved_config = copy.deepcopy(config)
        saved_config.architectures = [type(module).__name__]  # what save_pretrained records
        saved_config.save_pretrained(tmp)
        if program.tokenizer is not None:
            program.tokenizer.save_pretrained(tmp)
        gen_config = getattr(module, "generation_config", None)
        if gen_config is not None:
            gen_config.save_pretrained(tmp)
        weights = tmp / WEIGHTS
        manifest["weights"] = {"file": WEIGHTS, "bytes": weights.stat().st_size,
                               "sha256": _sha256(weights)}
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())
                             if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def manifest_for(program: Program, pipeline: str,
                 specs: dict[str, tuple[list[int], torch.dtype]],
                 aliases: dict[str, list[str]]) -> dict[str, Any]:
    """The manifest of ``program`` saved with tensors of ``specs`` (name -> shape, dtype); the
    caller adds where the weights are (``weights``) and the folder's ``files``."""
    module = program.module
    config = module.config
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": program.source,
        "pipeline": pipeline,
        "architecture": {"class": type(module).__name__,
                         "model_type": getattr(config, "model_type", None),
                         "family": program.arch.family, "kind": program.arch.kind,
                         "layers": program.arch.num_layers,
                         "tied_embeddings": program.arch.tied_embeddings},
        "dtype": str(_float_dtype(module)).removeprefix("torch."),
        "runtime": _runtime_options(config),
        "passes": [_jsonable(asdict(r)) for r in program.log],
        "tensors": {"count": len(specs),
                    "bytes": sum(math.prod(shape) * dtype.itemsize
                                 for shape, dtype in specs.values())},
        "modules": _module_manifest(module),
        "aliases": aliases,
    }


def _standard(module: nn.Module) -> tuple[tuple[Any, ...] | None, str]:
    """``((config, tensors, name, marker), "")`` of the first standard format that describes
    ``module``, else ``(None, why not)``."""
    why = ""
    for fmt in standard_formats():
        try:
            found = fmt.convert(module)
        except StandardFormatError as exc:
            why = str(exc)
            continue
        if found is not None:
            return (*found, fmt.marker), ""
    return None, why


def _save_standard(program: Program, pipeline: str, out: Path, config: Any,
                   tensors: dict[str, torch.Tensor], name: str, marker: str) -> dict[str, Any]:
    """Write a standard transformers checkpoint, after loading it into its transformers class
    here and comparing logits with the model (a folder that would not match is never written)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, initialization

    with initialization.no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=_float_dtype(program.module))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"the {name} checkpoint does not fit its own class: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    model.eval()
    probe = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = program.module(input_ids=probe, use_cache=False).logits.float()
        theirs = model(input_ids=probe, use_cache=False).logits.float()
    diff = float((mine - theirs).abs().max())
    if not diff <= 1e-4 * max(1.0, float(mine.abs().max())):
        raise CheckpointError(f"the {name} checkpoint's logits differ from the model's by {diff:.3g};"
                              " not written")
    facts = {"format": name, "class": type(model).__name__, "source": program.source,
             "source_family": program.arch.family, "pipeline": pipeline,
             "parity_max_abs_diff": diff,
             "passes": [_jsonable(asdict(r)) for r in program.log]}
    with output_lock(out), atomic_output(out) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if program.tokenizer is not None:
            program.tokenizer.save_pretrained(tmp)
        gen_config = getattr(program.module, "generation_config", None)
        if gen_config is not None:
            gen_config.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps(facts, indent=2, default=str) + "\n")
        facts["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return facts


def _program_and_pipeline(obj: Any) -> tuple[Program, str]:
    from modelfold import TransformResult
    from modelfold.ir.program import Program

    if isinstance(obj, TransformResult):
        return obj.program, _pipeline_from_log(obj.program, obj.pipeline)
    program = obj if isinstance(obj, Program) else Program(obj)
    return program, _pipeline_from_log(program, "")


def _pipeline_from_log(program: Program, fallback: str) -> str:
    """The pipeline string of every pass in ``program.log``: for a model that was loaded from a
    checkpoint and transformed again, the whole history, not only the last run."""
    from modelfold.passes.registry import get_pass

    try:
        return ",".join(repr(get_pass(r.name)(**r.options)) for r in program.log)
    except Exception:  # a pass no longer registered, or options it no longer takes
        return fallback


def check_destination(out: str | Path, overwrite: bool) -> None:
    """Raise ``CheckpointError`` if ``save_checkpoint(..., out, overwrite=overwrite)`` would refuse.

    For callers that want to fail before a long transform (the CLI's ``convert --save-model``).
    """
    try:
        check_output(out, overwrite=overwrite, what="checkpoint", markers=(MANIFEST,))
    except AssetError as exc:
        raise CheckpointError(str(exc)) from None


def _unique_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Persistent tensors under their first name, and first name -> the other names (ties).

    safetensors refuses tensors that share memory, so each tensor object is stored once; two
    distinct tensors that happen to overlap in memory (views) are stored as separate copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    first_name: dict[int, str] = {}
    storages: set[int] = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first_name:
            aliases.setdefault(first_name[id(t)], []).append(name)
            continue
        first_name[id(t)] = name
        if t.is_meta:
            raise CheckpointError(f"tensor '{name}' is on the meta device (no values to save); "
                                  "materialize the model first")
        data = t.detach().cpu().contiguous()
        ptr = data.untyped_storage().data_ptr()
        if ptr in storages or data.numel() == 0:
            data = data.clone()
        storages.add(data.untyped_storage().data_ptr())
        tensors[name] = data
    return tensors, aliases


def _module_manifest(module: nn.Module) -> list[dict[str, Any]]:
    """One entry per module of a registered type, parents before children."""
    entries = []
    for path, sub in module.named_modules(remove_duplicate=False):
        mtype = type_for_class(type(sub))
        if mtype is None or not path:
            continue
        facts = mtype.describe(sub)
        try:
            json.dumps(facts)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the facts describing module '{path}' ({mtype.name}) are not "
                                  f"JSON-serialisable: {exc}") from None
        entries.append({"path": path, "type": mtype.name, "python_module": mtype.cls.__module__,
                        "facts": facts})
    return entries


def _check_structure(saved: nn.Module, rebuilt: nn.Module) -> None:
    """Every module path must come back with its class (else its forward would be lost)."""
    have = {p: type(m) for p, m in saved.named_modules(remove_duplicate=False)}
    got = {p: type(m) for p, m in rebuilt.named_modules(remove_duplicate=False)}
    for path, cls in have.items():
        if got.get(path) is cls:
            continue
        where = f"module '{path}'" if path else "the model"
        there = got[path].__name__ if path in got else "nothing"
        if type_for_class(cls) is not None:
            raise CheckpointError(f"{where}: the checkpoint rule for {cls.__name__} rebuilt a "
                                  f"{there} instead")
        raise CheckpointError(
            f"{where} is a {cls.__name__}, but config.json rebuilds {there} there and no "
            f"checkpoint rule describes {cls.__name__}; register one with "
            "modelfold.checkpoint.register_module_type")
    extra = [p for p in got if p not in have]
    if extra:
        raise CheckpointError(f"config.json rebuilds module(s) {', '.join(extra[:4])} that the "
                              "model no longer has; a pass changed the structure without "
                              "updating the config")


def _runtime_options(config: Any) -> dict[str, str]:
    """Implementation choices that live on the config object but not in config.json."""
    keys = ("_attn_implementation", "_experts_implementation")
    return {k.lstrip("_"): v for k in keys if isinstance(v := getattr(config, k, None), str)}


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf; an "inf" SQNR means bit-identical
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- rebuilding --------------------------------------------------------------------------------
def _rebuild(config: Any, manifest: dict[str, Any], *, device: str) -> nn.Module:
    """The model of ``config`` with the manifest's modules swapped in and its aliases re-tied.

    Weights are left uninitialised (``device="cpu"``) or on the meta device (a dry run).
    """
    from transformers import initialization

    arch = manifest.get("architecture", {})
    runtime = manifest.get("runtime", {})
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    with torch.device(device), initialization.no_init_weights():
        model = _model_from_config(config, str(arch.get("class", "")), dtype,
                                   runtime.get("attn_implementation"))
        for entry in manifest.get("modules", []):
            mtype = _type_of_entry(entry)
            try:
                built = mtype.build(dict(entry.get("facts", {})))
                model.set_submodule(entry["path"], built, strict=True)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"cannot rebuild module '{entry.get('path')}' "
                                      f"({mtype.name}) from {entry.get('facts')}: "
                                      f"{type(exc).__name__}: {exc}") from exc
    if runtime.get("experts_implementation"):
        setter = getattr(model, "set_experts_implementation", None)
        if setter is not None:
            setter(runtime["experts_implementation"])
        else:
            model.config._experts_implementation = runtime["experts_implementation"]
    for hook in rebuild_hooks():
        hook(model)
    _retie(model, manifest.get("aliases", {}))
    return model.eval()


def _model_from_config(config: Any, class_name: str, dtype: torch.dtype,
                       attn_implementation: str | None) -> nn.Module:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from modelfold.assets import _is_causal_lm

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    try:
        model = auto.from_config(config, **kwargs)
    except Exception:
        model = None  # the exact class below may still build it
    if model is None or (class_name and type(model).__name__ != class_name):
        cls = getattr(transformers, class_name, None) if class_name else None
        if cls is None or not hasattr(cls, "_from_config"):
            raise CheckpointError(f"cannot build a {class_name or 'model'} for "
                                  f"model_type={getattr(config, 'model_type', None)!r} from "
                                  "config.json with this transformers version")
        try:
            model = cls._from_config(config, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"cannot build a {class_name} from config.json: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return model


def _retie(model: nn.Module, aliases: dict[str, list[str]]) -> None:
    """Make every alias name hold the very tensor object of its canonical name."""
    for canonical, names in aliases.items():
        target = _get_tensor(model, canonical)
        if target is None:
            raise CheckpointError(f"tied tensor '{canonical}' is not a parameter or buffer of the "
                                  "rebuilt model")
        for name in names:
            owner_path, _, attr = name.rpartition(".")
            current = _get_tensor(model, name)
            if current is None:
                raise CheckpointError(f"tied tensor '{name}' (an alias of '{canonical}') is not a "
                                      "parameter or buffer of the rebuilt model")
            if current.shape != target.shape:
                raise CheckpointError(f"tied tensor '{name}' has shape {list(current.shape)} in the "
                                      f"rebuilt model but '{canonical}' has {list(target.shape)}")
            owner = model.get_submodule(owner_path)
            if attr in owner._parameters:
                if not isinstance(target, nn.Parameter):
                    raise CheckpointError(f"'{name}' is a parameter but its tie '{canonical}' is "
                                          "a buffer")
                owner._parameters[attr] = target
            else:
                owner._buffers[attr] = target


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        return None
    if attr in owner._parameters:
        return owner._parameters[attr]
    return owner._buffers.get(attr)


def _canonical_state(model: nn.Module, aliases: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Persistent tensors of ``model`` under their canonical names; checks the ties match."""
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    first_name: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first_name:
            groups.setdefault(first_name[id(t)], []).append(name)
        else:
            first_name[id(t)] = name
            state[name] = t
    if groups != aliases:
        expected = {(c, a) for c, names in aliases.items() for a in names}
        actual = {(c, a) for c, names in groups.items() for a in names}
        diff = sorted(f"{a} -> {c}" for c, a in expected ^ actual)
        raise CheckpointError(f"tied tensors of the rebuilt model differ from the checkpoint's "
                              f"alias list: {', '.join(diff[:6])}")
    return state


def _tensor_specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[list[int], torch.dtype]]:
    return {name: (list(t.shape), t.dtype) for name, t in tensors.items()}


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Floating tensors may change precision (the file's dtype wins); integer layouts may not."""
    return a == b or (a.is_floating_point and b.is_floating_point)


def _check_tensors(expected: dict[str, torch.Tensor],
                   found: dict[str, tuple[list[int], torch.dtype]], *, when: str) -> None:
    """Strict comparison of the rebuilt model's tensors with the file's; one error names all."""
    problems = []
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if missing:
        problems.append(f"missing tensor(s) {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {', '.join(unexpected[:8])}")
    for name, t in expected.items():
        if name not in found:
            continue
        shape, dtype = found[name]
        if list(t.shape) != shape:
            problems.append(f"tensor '{name}' has shape {shape} in the file but "
                            f"{list(t.shape)} in the model")
        elif not _same_kind(t.dtype, dtype):
            problems.append(f"tensor '{name}' is {dtype} in the file but {t.dtype} in the model")
    if problems:
        prefix = "the checkpoint would not load" if when == "save" else "checkpoint does not match"
        raise CheckpointError(f"{prefix}: " + "; ".join(problems[:6]))


# -- loading -----------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``modelfold_checkpoint.json`` of a checkpoint folder.

    Raises:
        CheckpointError: no manifest, invalid JSON, or a format this version does not read.
    """
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"'{path}' is not a modelfold checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{manifest_path}' is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"'{manifest_path}' is not a modelfold checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {version!r}; this "
                              f"modelfold reads versions up to {FORMAT_VERSION}")
    return manifest


def load_checkpoint(path: str | Path, *, verify: bool = True, mmap: bool = False) -> Program:
    """Rebuild a saved transformed model; its logits equal the saved model's bit for bit.

    Args:
        path: a folder written by ``save_checkpoint``.
        verify: check the weights file's sha256 against the manifest (about 1 s per GB).
        mmap: map the weight files instead of reading them (no size or sha256 check): the
            tensors are read-only views of the files, paged in when used and reclaimable, so a
            checkpoint larger than memory can be exported (``modelfold.streaming``).

    Returns:
        A ``Program`` with the tokenizer (if saved), ``source`` = ``path`` and the saved pass log.

    Raises:
        CheckpointError: not a checkpoint, a corrupt or truncated file, an unknown module type,
            or tensors that do not match the rebuilt model (each named).
    """
    from transformers import AutoConfig

    from modelfold.ir.program import Program

    path = Path(path)
    manifest = read_manifest(path)
    refuse_remote_code(path)
    weights = manifest.get("weights", {})
    files = sorted(weights["shards"]) if "shards" in weights else [WEIGHTS]
    if mmap:
        tensors = {}
        for file in files:
            tensors.update(map_safetensors(path / file))
    elif "shards" in weights:  # a streamed checkpoint (modelfold.streaming): one shard per layer
        tensors = {}
        for file, facts in sorted(weights["shards"].items()):
            tensors.update(_read_weights(path / file, facts, verify))
    else:
        tensors = _read_weights(path / WEIGHTS, weights, verify)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read the config of checkpoint '{path}': "
                              f"{type(exc).__name__}: {exc}") from exc
    model = _rebuild(config, manifest, device="cpu")
    state = _canonical_state(model, manifest.get("aliases", {}))
    _check_tensors(state, _tensor_specs(tensors), when="load")
    for name, target in state.items():
        target.data = tensors[name]  # keeps the object: its ties and Parameter-ness survive
    if (path / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    if lora_layers(model):  # only the active adapters train, as after the lora pass
        from modelfold.passes.lora import mark_trainable

        mark_trainable(model)
    program = Program(model, tokenizer=_load_tokenizer(path), source=str(path))
    program.log = _restore_log(manifest.get("passes", []))
    program.graph_passes = _graph_passes(program.log)
    return program


def _read_weights(weights: Path, facts: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, after the size (and sha256) check.

    The file is read into memory in one pass (hashed from the same bytes) rather than memory-
    mapped: the model must not change, or fault, if the file is later replaced. Measured on the
    int4 SmolLM2 checkpoint (79 MB): 0.15-0.4 s, vs 0.4-2.6 s to clone mmap-backed tensors.
    """
    from safetensors.torch import load

    if not weights.is_file():
        raise CheckpointError(f"checkpoint '{weights.parent}' has no {weights.name}")
    data = weights.read_bytes()
    if facts.get("bytes") is not None and len(data) != facts["bytes"]:
        raise CheckpointError(f"'{weights}' is truncated or corrupt: {len(data):,} bytes, the "
                              f"manifest says {facts['bytes']:,}")
    if verify and facts.get("sha256") and hashlib.sha256(data).hexdigest() != facts["sha256"]:
        raise CheckpointError(f"'{weights}' is corrupt: its sha256 differs from the manifest's")
    try:
        return load(data)
    except Exception as exc:  # safetensors' errors for a truncated or damaged file
        raise CheckpointError(f"'{weights}' is corrupt or truncated: {type(exc).__name__}: "
                              f"{exc}") from exc


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_entries(file: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """``name -> (dtype, shape, byte offset in the file, byte count)`` from a safetensors file's
    header, checked against the file's size; nothing else is read."""
    import struct

    if not file.is_file():
        raise CheckpointError(f"checkpoint '{file.parent}' has no {file.name}")
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if 8 + length + end > size:
                raise ValueError(f"tensor '{name}' runs past the end of the file")
            entries[name] = (_ST_DTYPES[info["dtype"]], list(info["shape"]), 8 + length + begin,
                             end - begin)
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, KeyError,
            TypeError, ValueError) as exc:
        raise CheckpointError(f"'{file}' is corrupt or truncated: {exc}") from None
    return entries


def map_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private, read-only-in-practice memory map
    of it (``torch.from_file``): nothing is read until a tensor is used."""
    entries = safetensors_entries(file)
    data = torch.from_file(str(file), shared=False, size=file.stat().st_size, dtype=torch.uint8)
    tensors = {}
    for name, (dtype, shape, offset, nbytes) in entries.items():
        raw = data[offset:offset + nbytes]
        if offset % dtype.itemsize:  # unaligned: a copy is the only way to view it
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def _load_tokenizer(path: Path) -> Any:
    from modelfold.assets import _TOKENIZER_FILES

    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer of checkpoint '{path}': "
                              f"{type(exc).__name__}: {exc}") from exc


def _restore_log(records: list[dict[str, Any]]) -> list:
    from modelfold.ir.program import PassRecord

    names = {f.name for f in fields(PassRecord)}
    log = []
    for raw in records:
        record = {k: v for k, v in raw.items() if k in names}
        record["fidelity"] = {k: _float_back(v) for k, v in record.get("fidelity", {}).items()}
        with contextlib.suppress(TypeError):
            log.append(PassRecord(**record))
    return log


def _graph_passes(log: list) -> list:
    """The graph passes of a saved run, rebuilt so the reloaded program's graph has them too (the
    checkpoint holds the module; graph rewrites are replayed on its capture)."""
    from modelfold.passes.registry import get_pass

    passes = []
    for record in log:
        if record.level == "graph":
            try:
                passes.append(get_pass(record.name)(**record.options))
            except Exception as exc:
                raise CheckpointError(f"the checkpoint's graph pass {record.name!r} cannot be "
                                      f"rebuilt by this modelfold: {exc}") from exc
    return passes


def _float_back(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value


__all__ = [
    "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "CheckpointError", "ModuleType", "check_destination",
    "is_checkpoint",
    "load_checkpoint", "read_manifest", "register_module_type", "registered_module_types",
    "save_checkpoint",
]
