"""Models larger than memory: transform a checkpoint one decoder layer at a time.

    result = stream_transform("llama-7b/", "quantize{method=gptq}", "llama-7b-int4/")

The model is built on the meta device from ``config.json``; the embeddings, final norm and LM
head are loaded; then each pass walks the decoder layers in order (``LayerwiseRunner.layers`` or
``each_layer``): layer ``i`` is read from the checkpoint's safetensors shards (float32 / bfloat16 /
float16, cast to float32), transformed, written as its own shard, and freed. Calibrating passes
keep only the activations between layers (spilled to disk past ``activation_budget``). The
output is a sharded modelfold checkpoint (``model.safetensors.index.json`` + one shard per
layer) that ``modelfold.load`` / ``convert`` read like any other.

Resume: each finished layer is committed atomically (its shard, the next layer's inputs for
this rank, then ``stream_state.json``) under ``<out>.partial/``; the same command run again
continues after the last committed layer and ends with the same checkpoint.

A pipeline of several passes streams once per pass (pass ``k`` reads pass ``k - 1``'s output).
A pass streams when its class sets ``streams = True`` (and ``stream_refusal`` has no objection);
any other pass is refused with a message that says why.

Fidelity: the probe batch's logits are computed by the same layer-at-a-time forward on the input
and on the written output (``streamed_logits``), and compared as the pass manager compares them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from modelfold.assets import AssetError, check_output, output_lock, refuse_remote_code
from modelfold.checkpoint import _jsonable, safetensors_entries
from modelfold.distributed import barrier, is_main, rank_and_world

STATE = "stream_state.json"
INDEX = "model.safetensors.index.json"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class StreamError(AssetError):
    """A checkpoint or pipeline that cannot be streamed (the message says why and what to do)."""


# -- reading checkpoints one tensor at a time ---------------------------------------------------
class TensorSource:
    """The tensors of a safetensors checkpoint folder (a Hugging Face model, sharded or not, or a
    modelfold checkpoint), read one at a time with ``pread`` (not memory-mapped, so a tensor
    that was read and dropped leaves no file pages counted in the process's memory)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise StreamError(f"'{index}' is not a safetensors index: {exc}") from None
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise StreamError(
                f"'{self.path}' has no model.safetensors or {INDEX}; streaming reads safetensors "
                "checkpoints only (pickled .bin files are never loaded)")
        self.files: dict[str, Path] = {}
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in names:
            file = self.path / name
            if not file.is_file():
                raise StreamError(f"'{index}' names shard '{name}', which is missing")
            try:
                entries = safetensors_entries(file)
            except AssetError as exc:
                raise StreamError(str(exc)) from None
            self.entries.update(entries)
            self.files.update(dict.fromkeys(entries, file))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def spec(self, name: str) -> tuple[list[int], torch.dtype]:
        """``(shape, dtype)`` of tensor ``name`` without reading it."""
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise StreamError(f"tensor '{name}' is missing from checkpoint '{self.path}'")
        dtype, shape, offset, nbytes = self.entries[name]
        buffer = bytearray(nbytes)
        with open(self.files[name], "rb", buffering=0) as handle:
            handle.seek(offset)
            if handle.readinto(buffer) != nbytes:
                raise StreamError(f"'{self.files[name]}' is truncated (tensor '{name}')")
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def float32_bytes(self) -> int:
        """Bytes of the floating-point tensors once cast to float32 (what loading costs)."""
        return sum(4 * int(torch.Size(shape).numel())
                   for dtype, shape, _, _ in self.entries.values() if dtype in _FLOATS)

    def fingerprint(self) -> str:
        files = sorted(set(self.files.values()))
        facts = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
        return json.dumps([str(self.path.resolve()), facts])


# -- the model skeleton -------------------------------------------------------------------------
def build_skeleton(path: Path) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model of ``path``'s config on the meta device (a modelfold checkpoint: with its
    replaced modules), with the non-persistent buffers (rotary frequencies) computed."""
    from transformers import AutoConfig, AutoModelForCausalLM, initialization

    from modelfold.assets import _is_causal_lm
    from modelfold.checkpoint import _rebuild, is_checkpoint, read_manifest

    refuse_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise StreamError(f"cannot read the config of '{path}': {type(exc).__name__}: {exc}"
                          ) from exc
    if not _is_causal_lm(config):
        raise StreamError(f"streaming supports decoder-only language models; '{path}' is a "
                          f"{config.model_type} encoder")
    manifest = None
    if is_checkpoint(path):
        manifest = read_manifest(path)
        model = _rebuild(config, manifest, device="meta")
    else:
        with torch.device("meta"), initialization.no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if getattr(config, "tie_word_embeddings", False):  # the head is the embedding table
            model.tie_weights()
    _compute_buffers(model, config)
    return model.eval(), manifest


def _compute_buffers(model: nn.Module, config: Any) -> None:
    """Fill the meta model's non-persistent buffers from a one-layer twin built on the CPU
    (they are functions of the config, absent from checkpoints)."""
    import copy

    from transformers import AutoModelForCausalLM, initialization

    persistent = set(model.state_dict(keep_vars=True))
    wanted = [n for n, b in model.named_buffers() if b.is_meta and n not in persistent]
    if not wanted:
        return
    twin_config = copy.deepcopy(config)
    twin_config.num_hidden_layers = 1
    if isinstance(getattr(twin_config, "layer_types", None), list):
        twin_config.layer_types = twin_config.layer_types[:1]
    with initialization.no_init_weights():
        twin = AutoModelForCausalLM.from_config(twin_config, dtype=torch.float32)
    buffers = dict(twin.named_buffers())
    from modelfold.ir.architecture import describe

    prefix = describe(model).layers + "."
    for name in wanted:
        source = name
        if name.startswith(prefix):  # a layer's own buffer: layer 0's twin
            rest = name[len(prefix):].split(".", 1)[1]
            source = f"{prefix}0.{rest}"
        if source not in buffers:
            raise StreamError(f"cannot compute the non-persistent buffer '{name}' for streaming")
        _assign(model, name, buffers[source].clone())


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` at tensor path ``name`` (the module is kept); returns the object stored (a
    new Parameter for a parameter, unless ``value`` is one: a tie shares that object)."""
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if attr in owner._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise StreamError(f"'{name}' is neither a parameter nor a buffer of the model")
    return value


def _load_into(module: nn.Module, prefix: str, source: TensorSource) -> None:
    """Fill every (meta) tensor of ``module`` from ``source`` under ``prefix``, as float32 where
    the model's tensor is float32 (checkpoints may store bfloat16 / float16)."""
    seen: dict[int, torch.Tensor] = {}
    for name, current in module.state_dict(keep_vars=True).items():
        if id(current) in seen:  # tied within the module: assigned with its first name
            _assign(module, name, seen[id(current)])
            continue
        full = prefix + name
        value = source.get(full)
        if list(value.shape) != list(current.shape):
            raise StreamError(f"tensor '{full}' has shape {list(value.shape)} in the checkpoint; "
                              f"the model expects {list(current.shape)}")
        if value.dtype != current.dtype:
            if not (value.is_floating_point() and current.is_floating_point()):
                raise StreamError(f"tensor '{full}' is {value.dtype} in the checkpoint; the model "
                                  f"expects {current.dtype}")
            value = value.to(current.dtype)
        seen[id(current)] = _assign(module, name, value)


# -- the residency of a streamed program ----------------------------------------------------------
class DiskTensors:
    """Per-batch activations as safetensors files in a folder, loaded one at a time."""

    def __init__(self, folder: Path, count: int = 0):
        self.folder, self.count = folder, count

    def _file(self, b: int) -> Path:
        return self.folder / f"batch-{b:05d}.safetensors"

    def append(self, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{self.count}"
        save_file({"hidden": tensor.contiguous()}, str(tmp))
        os.replace(tmp, self._file(self.count))
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if not 0 <= b < self.count:
            raise IndexError(b)
        return load_file(str(self._file(b)))["hidden"]


class ActivationSink:
    """A layer's outputs, per batch: in memory until they exceed ``budget`` bytes, then all on
    disk (``DiskTensors``), so calibration never holds more than the budget plus one batch."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = folder, budget
        self.memory: list[torch.Tensor] = []
        self.disk: DiskTensors | None = None
        self.bytes = 0

    def append(self, tensor: torch.Tensor) -> None:
        if self.disk is not None:
            self.disk.append(tensor)
            return
        self.memory.append(tensor)
        self.bytes += tensor.numel() * tensor.element_size()
        if self.bytes > self.budget:
            self.spill()

    def spill(self) -> DiskTensors:
        if self.disk is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.disk = DiskTensors(self.folder)
            for t in self.memory:
                self.disk.append(t)
            self.memory = []
        return self.disk

    def __len__(self) -> int:
        return len(self.disk) if self.disk is not None else len(self.memory)

    def __getitem__(self, b: int) -> torch.Tensor:
        return self.disk[b] if self.disk is not None else self.memory[b]


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StreamResidency:
    """Loads, writes and frees the decoder layers of a streamed program (see the module doc).

    ``LayerwiseRunner`` and ``each_layer`` call ``ensure`` before a layer is used, ``commit``
    after the pass is done with it (and has advanced the activations through it), ``resume``
    once to learn where an interrupted run stopped.
    """

    def __init__(self, program: Any, source: TensorSource, work: Path, *, key: str,
                 activation_budget: int, log: Callable[[str], None] | None = None,
                 readonly: bool = False):
        self.program, self.source, self.work = program, source, work
        self.layers_path = program.arch.layers
        self.stack: nn.ModuleList = program.module.get_submodule(self.layers_path)
        self.count = len(self.stack)
        self.budget = activation_budget
        self.log = log
        self.readonly = readonly
        self.rank, self.world = rank_and_world()
        self.loaded: dict[int, list[nn.Module]] = {}
        self.started = time.perf_counter()
        self.layer_seconds: list[float] = []
        self._last = self.started
        self.state: dict[str, Any] = {"key": key, "done": 0, "layers": {}, "activations": None}
        if not readonly:
            state_file = work / STATE
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                if state.get("key") == key:
                    self.state = state
            elif is_main():
                work.mkdir(parents=True, exist_ok=True)
        self.resumed_from = int(self.state["done"])

    # -- the protocol LayerwiseRunner / each_layer use --------------------------------------------
    def ensure(self, index: int) -> None:
        if index in self.loaded:
            return
        layer = self.stack[index]
        _load_into(layer, f"{self.layers_path}.{index}.", self.source)
        self.loaded[index] = list(layer.modules())

    def resume(self, batches: int) -> tuple[int, Any]:
        done = int(self.state["done"])
        for index in [i for i in self.loaded if i < done]:
            self._release(index)
        if done and self.log and batches:
            self.log(f"    resuming after layer {done}/{self.count} (finished earlier, in "
                     f"{self.work})")
        hidden = None
        folder = self.state.get("activations")
        if done and batches and folder:
            hidden = DiskTensors(self.work / folder / f"rank{self.rank}", batches)
            if not all(hidden._file(b).is_file() for b in range(batches)):
                raise StreamError(f"the saved activations of layer {done - 1} in {self.work} are "
                                  "incomplete; delete that folder to start over")
        return done, hidden

    def activation_sink(self, index: int) -> ActivationSink:
        return ActivationSink(self.work / f"act-{index:05d}" / f"rank{self.rank}", self.budget)

    def commit(self, index: int, hidden: Any) -> None:
        """Layer ``index`` is final: write it (and the next layer's inputs), record it, free it."""
        if self.readonly:
            self._release(index)
            return
        from modelfold.checkpoint import _module_manifest

        layer = self.stack[index]
        prefix = f"{self.layers_path}.{index}."
        entry: dict[str, Any] = {}
        if is_main():
            tensors = _layer_tensors(layer, prefix)
            file = f"model-layer-{index:05d}.safetensors"
            _save_atomic(tensors, self.work / file)
            entry = {"file": file, "tensors": sorted(tensors),
                     "modules": [{**m, "path": prefix + m["path"]}
                                 for m in _module_manifest(layer)]}
        folder = None
        if hidden is not None:
            folder = f"act-{index:05d}"
            if isinstance(hidden, ActivationSink):
                hidden.spill()  # resume needs them on disk
            elif not isinstance(hidden, DiskTensors):
                sink = ActivationSink(self.work / folder / f"rank{self.rank}", 0)
                for t in hidden:
                    sink.append(t)
        barrier()  # every rank's activations are on disk before the state says so
        previous = self.state.get("activations")
        self.state["layers"][str(index)] = entry
        self.state["done"] = index + 1
        self.state["activations"] = folder
        if is_main():
            _write_json_atomic(self.work / STATE, self.state)
        barrier()
        if previous and previous != folder:
            shutil.rmtree(self.work / previous / f"rank{self.rank}", ignore_errors=True)
            with contextlib.suppress(OSError):  # the last rank out removes the folder
                (self.work / previous).rmdir()
        self._release(index)
        self._progress(index)
        if os.environ.get("MODELFOLD_STREAM_KILL_AFTER") == str(index):  # crash-recovery tests
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    # -- internals ------------------------------------------------------------------------------
    def _release(self, index: int) -> None:
        modules = self.loaded.pop(index, [])
        for m in [*modules, self.stack[index]]:
            m.to("meta")
        _return_freed_memory()

    def _progress(self, index: int) -> None:
        now = time.perf_counter()
        self.layer_seconds.append(now - self._last)
        self._last = now
        if not self.log or not is_main():
            return
        done_now = len(self.layer_seconds)
        remaining = self.count - index - 1
        per_layer = (now - self.started) / done_now
        self.log(f"    layer {index + 1}/{self.count}: {self.layer_seconds[-1]:.1f}s, elapsed "
                 f"{_clock(now - self.started)}, projected finish in "
                 f"{_clock(per_layer * remaining)}, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: a layer's worth of
    fragmented heap per layer, measured +35 MB per 46 MB layer without this)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _layer_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in layer.state_dict(keep_vars=True).items():
        if id(t) in seen:
            raise StreamError(f"'{prefix}{name}' is tied to another tensor of its layer; "
                              "streaming writes each tensor once per layer and cannot keep that tie")
        seen.add(id(t))
        tensors[prefix + name] = t.detach().contiguous().clone()
    return tensors


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# -- budgets -----------------------------------------------------------------------------------
def available_memory() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (total memory where that is unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_memory() -> int:
    """The default ``--max-memory``: 80 % of the memory available now."""
    return int(0.8 * available_memory())


def parse_bytes(text: str | int) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5G"`` or a plain byte count."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
             "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    raw = str(text).strip().lower()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):].strip()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise StreamError(f"cannot read the size {text!r}; write e.g. 8GB, 512MiB or 2e9"
                          ) from None
    if value <= 0:
        raise StreamError(f"a memory size must be positive; got {text!r}")
    return int(value)


def needs_streaming(path: str | Path, max_memory: int | None = None) -> tuple[bool, str]:
    """Whether transforming ``path`` in memory would exceed ``max_memory`` (default
    ``default_max_memory()``): an in-memory run holds the float32 weights about twice (the
    model and, while a layer is replaced, its copy, plus the export's graph), so the checkpoint
    streams when twice its float32 size is over the budget. Returns ``(stream, why)``."""
    budget = max_memory or default_max_memory()
    try:
        weights = TensorSource(path).float32_bytes()
    except StreamError:
        return False, "not a safetensors checkpoint"
    need = 2 * weights
    verdict = need > budget
    why = (f"float32 weights {weights / 2**30:.2f} GiB x 2 = {need / 2**30:.2f} GiB "
           f"{'>' if verdict else '<='} the memory budget {budget / 2**30:.2f} GiB")
    return verdict, why


# -- the driver ----------------------------------------------------------------------------------
def check_streams(passes: list[Any]) -> None:
    """Raise ``StreamError`` for a pass that cannot run one layer at a time (says why)."""
    from modelfold.passes.registry import registered_passes

    streaming = sorted(name for name, cls in registered_passes().items()
                       if getattr(cls, "streams", False))
    for p in passes:
        if not getattr(p, "streams", False):
            raise StreamError(
                f"pass {p.name!r} needs the whole model in memory and cannot stream one layer at "
                f"a time; passes that stream: {', '.join(streaming)}. Run it without --stream "
                "on a machine with enough memory (or on a streamed, smaller output)")
        why = p.stream_refusal()
        if why:
            raise StreamError(f"{p!r} cannot stream: {why}")
    from modelfold.passes.manager import check_distributable

    check_distributable(passes)


def stream_transform(model: str | Path, passes: Any, out: str | Path, *,
                     activation_budget: int | str = "2GB", overwrite: bool = False,
                     resume: bool = True, measure: bool = True,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Transform the checkpoint folder ``model`` layer by layer into the checkpoint ``out``.

    Args:
        model: a Hugging Face safetensors folder (sharded or not) or a modelfold checkpoint.
        passes: a pipeline (string, recipe or list) of passes that stream.
        out: the checkpoint folder to write (sharded; ``modelfold.load`` reads it).
        activation_budget: calibration activations above this many bytes (per rank) go to disk.
        overwrite: replace an existing checkpoint at ``out`` (and discard a partial run).
        resume: continue a partial run of the same command (``<out>.partial``); False starts over.
        measure: compare the probe batch's logits of input and output (a streamed forward of each).
        log: where progress lines go (default stderr; rank 0 only).

    Returns:
        The checkpoint's manifest (``passes`` holds each pass's record with its ``streaming``
        facts: layers, seconds per layer, peak RSS, resumed-from); ``{}`` on ranks other than 0.
    """
    from modelfold.assets import resolve_model
    from modelfold.checkpoint import MANIFEST, check_destination
    from modelfold.passes.pipeline import build_pipeline

    if log is None:
        def log(line: str) -> None:
            if is_main():
                print(line, file=sys.stderr, flush=True)
    source_path = resolve_model(model)
    pipeline = build_pipeline(passes)
    if not pipeline:
        raise StreamError("streaming needs at least one pass (nothing to transform)")
    check_streams(pipeline)
    out = Path(out)
    if is_main():
        check_destination(out, overwrite)
    work = out.with_name(out.name + ".partial")
    if work.exists() and (overwrite or not resume) and is_main():
        shutil.rmtree(work)
    barrier()
    budget = parse_bytes(activation_budget)
    lock = output_lock(out) if is_main() else contextlib.nullcontext()
    with lock:
        current = source_path
        manifest: dict[str, Any] = {}
        for k, p in enumerate(pipeline):
            stage = work / f"stage-{k}"
            result = stage / "result"
            log(f"[{k + 1}/{len(pipeline)}] {p!r} (streaming {current})")
            if (result / MANIFEST).is_file():
                log("    finished in an earlier run")
            else:
                _stream_pass(p, current, stage, result, budget=budget, measure=measure,
                             log=log, pipeline_key=repr(pipeline[:k + 1]))
            barrier()
            current = result
            if is_main():  # the others may not read it: rank 0 moves it into place below
                manifest = json.loads((result / MANIFEST).read_text())
        if is_main():
            if out.exists():
                check_output(out, overwrite=True, what="checkpoint", markers=(MANIFEST,))
                shutil.rmtree(out)
            os.replace(current, out)
            shutil.rmtree(work, ignore_errors=True)
        barrier()
    return manifest


def _stream_pass(p: Any, source_path: Path, stage: Path, result: Path, *, budget: int,
                 measure: bool, log: Callable[[str], None], pipeline_key: str) -> None:
    from modelfold.checkpoint import _restore_log
    from modelfold.ir.program import PassRecord, Program
    from modelfold.passes.fidelity import compare, probe_inputs

    source = TensorSource(source_path)
    skeleton, source_manifest = build_skeleton(source_path)
    tokenizer = _tokenizer(source_path)
    program = Program(skeleton, tokenizer=tokenizer, source=str(source_path))
    if source_manifest:
        program.log = _restore_log(source_manifest.get("passes", []))
    _, world = rank_and_world()
    key = hashlib.sha256(json.dumps([source.fingerprint(), pipeline_key, world]).encode()
                         ).hexdigest()
    _load_outside_layers(program, source)
    residency = StreamResidency(program, source, stage, key=key, activation_budget=budget,
                                log=log)
    program.residency = residency
    p.requires(program)
    record = PassRecord(name=p.name, options=p.config.to_dict(), kind=p.kind_for(program),
                        level=p.level)
    start = time.perf_counter()
    details = p.run(program) or {}
    record.seconds = time.perf_counter() - start
    record.skipped.extend(details.pop("skipped", []))
    if residency.state["done"] != residency.count:
        raise StreamError(f"{p.name} left layers {residency.state['done']}..{residency.count - 1}"
                          " unwritten; it does not walk the layers as streaming requires")
    details["streaming"] = {
        "layers": residency.count,
        "resumed_after_layer": residency.resumed_from or None,
        "seconds_per_layer": [round(s, 2) for s in residency.layer_seconds],
        "peak_rss_bytes": peak_rss_bytes(),
        "activation_budget_bytes": budget,
        "world_size": world,
        "source_float32_bytes": source.float32_bytes(),
    }
    if residency.resumed_from:
        details["streaming"]["note"] = (
            f"layers 0..{residency.resumed_from - 1} were written by an earlier, interrupted run; "
            "their per-layer report entries are in that run's log")
    record.details = details
    program.residency = None
    if is_main():
        _finish_checkpoint(program, residency, record, result)
        if measure:
            probe, desc = probe_inputs(program)
            before = streamed_logits(source_path, probe)
            after = streamed_logits(result, probe)
            record.fidelity = compare(before, after)
            record.fidelity["probe"] = desc
            manifest = json.loads((result / "modelfold_checkpoint.json").read_text())
            manifest["passes"][-1]["fidelity"] = _jsonable(record.fidelity)
            _write_json_atomic(result / "modelfold_checkpoint.json", manifest)
            log(f"    probe logits vs input: SQNR {record.fidelity['sqnr_db']:.1f} dB, top-1 "
                f"agreement {record.fidelity['top1_agreement']:.3f}")
        log(f"    done in {_clock(record.seconds)}; peak RSS "
            f"{details['streaming']['peak_rss_bytes'] / 2**30:.2f} GiB")


def _tokenizer(path: Path) -> Any:
    from modelfold.checkpoint import _load_tokenizer

    try:
        return _load_tokenizer(path)
    except Exception:
        return None


def _load_outside_layers(program: Any, source: TensorSource) -> None:
    """Load every tensor that is not in a decoder layer (embeddings, final norm, LM head)."""
    model = program.module
    prefix = program.arch.layers + "."
    seen: dict[int, torch.Tensor] = {}
    for name, current in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix):
            continue
        if id(current) in seen:
            _assign(model, name, seen[id(current)])
            continue
        value = source.get(name)
        if value.is_floating_point() and current.is_floating_point():
            value = value.to(current.dtype)
        if list(value.shape) != list(current.shape):
            raise StreamError(f"tensor '{name}' has shape {list(value.shape)}; the model "
                              f"expects {list(current.shape)}")
        seen[id(current)] = _assign(model, name, value)


def _finish_checkpoint(program: Any, residency: StreamResidency, record: Any,
                       result: Path) -> None:
    """Write the non-layer tensors, the index, config, tokenizer and manifest; check that the
    folder rebuilds (structure and every tensor's shape and dtype) before it is moved in place."""
    import copy

    from modelfold.checkpoint import (
        MANIFEST,
        _canonical_state,
        _check_structure,
        _check_tensors,
        _pipeline_from_log,
        _rebuild,
        _sha256,
        _type_of_entry,
        manifest_for,
    )

    model = program.module
    stage = residency.work
    prefix = program.arch.layers + "."
    # layers finished by an earlier run still have their input structure here: rebuild theirs
    for index in range(residency.resumed_from):
        for entry in residency.state["layers"][str(index)]["modules"]:
            model.set_submodule(entry["path"], _type_of_entry(entry).build(
                dict(entry["facts"])).to("meta"), strict=True)
    rest: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix):
            continue
        if id(t) in first:
            aliases.setdefault(first[id(t)], []).append(name)
            continue
        first[id(t)] = name
        rest[name] = t.detach().contiguous().clone()
    _save_atomic(rest, stage / "model-rest.safetensors")
    weight_map = {name: "model-rest.safetensors" for name in rest}
    for index in range(residency.count):
        entry = residency.state["layers"][str(index)]
        weight_map.update({name: entry["file"] for name in entry["tensors"]})
    files = sorted(set(weight_map.values()))
    config = model.config
    tmp = stage / ".result"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file in files:  # hard links: the stage folder's shards stay until the run is done
        try:
            os.link(stage / file, tmp / file)
        except OSError:
            shutil.copy2(stage / file, tmp / file)
    total = sum((tmp / f).stat().st_size for f in files)
    _write_json_atomic(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    saved_config = copy.deepcopy(config)
    saved_config.architectures = [type(model).__name__]
    saved_config.save_pretrained(tmp)
    if program.tokenizer is not None:
        program.tokenizer.save_pretrained(tmp)
    source = Path(program.source)
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", tmp / "generation_config.json")
    source_out = TensorSource(tmp)
    specs = {name: source_out.spec(name) for name in weight_map}
    program.log.append(record)
    manifest = manifest_for(program, _pipeline_from_log(program, ",".join(r.name for r in
                                                                           program.log)),
                            specs, aliases)
    manifest["weights"] = {"index": INDEX, "shards": {f: {"bytes": (tmp / f).stat().st_size,
                                                          "sha256": _sha256(tmp / f)}
                                                      for f in files}}
    manifest["streamed"] = True
    rebuilt = _rebuild(config, manifest, device="meta")
    _check_structure(model, rebuilt)
    _check_tensors(_canonical_state(rebuilt, aliases), specs, when="save")
    manifest["files"] = {q.name: q.stat().st_size for q in sorted(tmp.iterdir()) if q.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, result)


# -- ONNX artifacts of streamed checkpoints ---------------------------------------------------------
def export_streamed(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                    options: Any = None, progress: Callable[[str], None] | None = None
                    ) -> dict[str, Any]:
    """Export a (streamed) checkpoint to an ONNX Runtime artifact without reading its weights
    into memory: the tensors are memory-mapped views of the shards (``load_checkpoint(...,
    mmap=True)``), so the graph is captured from tensors that are paged in only when the
    lowering or the writer of the external data reads them, and those pages are file-backed
    (the kernel reclaims them under pressure), and the exporter's weights file is kept as it
    streamed it (``ExportOptions.bounded_memory``: no offline optimization or deduplication,
    which would load it back). Returns the artifact manifest plus ``peak_rss_bytes``."""
    from dataclasses import replace

    import modelfold
    from modelfold.backends.onnxruntime.options import ExportOptions
    from modelfold.checkpoint import load_checkpoint

    program = load_checkpoint(checkpoint, mmap=True)
    options = replace(options or ExportOptions(), bounded_memory=True)
    manifest = modelfold.export(program, out, overwrite=overwrite, options=options,
                                progress=progress or False)
    return {**manifest, "peak_rss_bytes": peak_rss_bytes()}


# -- a forward pass one layer at a time -----------------------------------------------------------
class _Replay(nn.Module):
    """Stands in for the first layer and returns the precomputed last hidden state; the other
    layers pass through, so the model's own forward applies its final norm and head."""

    def __init__(self, hidden: torch.Tensor | None, tuple_output: bool):
        super().__init__()
        self.hidden, self.tuple_output = hidden, tuple_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.get("hidden_states", args[0] if args else None) \
            if self.hidden is None else self.hidden
        return (hidden,) if self.tuple_output else hidden


@torch.no_grad()
def streamed_logits(path: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint at ``path`` for ``input_ids``, holding one layer at a time."""
    from modelfold.ir.program import Program
    from modelfold.passes.layerwise import LayerwiseRunner

    path = Path(path)
    source = TensorSource(path)
    skeleton, _ = build_skeleton(path)
    program = Program(skeleton, source=str(path))
    _load_outside_layers(program, source)
    program.residency = StreamResidency(program, source, path, key="", activation_budget=2**62,
                                        readonly=True)
    runner = LayerwiseRunner(program, input_ids, batch_size=len(input_ids), desc="forward",
                             distribute=False)
    for index, _layer in runner.layers():
        runner.advance(index)
    stack = program.module.get_submodule(program.arch.layers)
    for i in range(len(stack)):
        stack[i] = _Replay(runner.hidden[0] if i == 0 else None, runner.tuple_output)
    program.residency = None
    return program.module_logits(input_ids).float()


__all__ = ["DiskTensors", "StreamError", "StreamResidency", "TensorSource", "build_skeleton",
           "check_streams", "default_max_memory", "export_streamed", "needs_streaming",
           "parse_bytes",
           "stream_transform", "streamed_logits"]
