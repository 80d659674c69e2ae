"""modelfold's own CPU kernels for ONNX Runtime: a custom-op library built from C on first use.

An artifact stays a standard ONNX file that any ONNX Runtime runs. When ``OnnxCausalLM`` (or
``create_session``) opens it with ``kernels="auto"`` (the default) or ``"modelfold"``, the graph is
rewritten in memory before the session is created:

- every ``com.microsoft::MatMulNBits`` with 4-bit weights in blocks of 128, accuracy level 4 (int8
  activations) and constant weights becomes ``ai.modelfold::MatMulInt4`` (``csrc/q4.c``), and
  every one with 8-bit weights in blocks of 32 ``ai.modelfold::MatMulInt8`` (``csrc/q8.c``): the
  weights are repacked once so that one AVX-512 VNNI instruction accumulates 16 output rows; the
  arithmetic is ONNX Runtime's (activations quantized per block with its rounding rule; outputs
  agree to float rounding, about 1e-7 relative); the fusions below apply to both;
- every float32 ``MatMul`` of a constant ``[K, N]`` weight (the projections, an untied LM head)
  becomes ``ai.modelfold::MatMulF32`` (``csrc/f32.c``): the weight is packed once into panels of
  32 columns (one copy per weight in the process, whatever the nodes that read it: tied layers),
  ONNX Runtime's memory-mapped original leaves the resident set, and one layout serves a decode
  step's GEMV (several panels streamed at once) and a prompt's GEMM (a 12 x 32 register tile);
  each output is one running sum in k order, as MLAS's; the fusions below apply to it;
- a SwiGLU MLP's ``Split -> QuickGelu(gate) -> Mul(., up) -> MatMulNBits(down)`` (or ``MatMul``)
  becomes one ``MatMulInt4`` / ``MatMulInt8`` / ``MatMulF32`` with ``activation=1``, which
  computes ``silu(gate) * up`` as it reads its input (three nodes fewer per layer); where the down
  projection is not ours (a weight that is not an initializer, a ``MatMulNBits`` the kernels do
  not take), the ``Split -> QuickGelu -> Mul`` becomes one ``ai.modelfold::SwiGLU`` (two nodes
  fewer per layer);
- a ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm) whose normalized output only a
  projection reads becomes part of that projection (``activation=2``: it writes the residual sum,
  normalizes and projects; two nodes fewer per layer);
- a float32 LM head that is a ``FusedMatMul`` with ``transB`` over a tied embedding table (whose
  output is a graph output) becomes ``MatMulF32`` with ``trans_b=1``: the table is not packed (the
  embedding ``Gather`` reads it too); up to 8 rows (a generation step) run a GEMV that reads it
  where it lies, more rows (an evaluation batch) run ONNX Runtime's own kernel, invoked from ours.
  ONNX Runtime's kernel keeps a packed copy of the table beside the one the ``Gather`` reads
  (110 MB more memory for SmolLM2 in float32);
- every ``com.microsoft::GroupQueryAttention`` over a float32 cache (past and present graph inputs
  / outputs no other node reads) becomes ``ai.modelfold::CachedAttention`` (``csrc/attn.c``), or
  ``CachedAttentionF16`` with ``kv_cache="float16"`` (the past / present become float16): the
  query heads of a KV head read its cache in one pass, keys in tiles of 16 positions
  (``to_kernel_layout``), a decode step split into chunks of the cache across threads.

The library is compiled with the system C compiler (``$CC``, else ``gcc`` / ``cc``) into
``<modelfold cache>/kernels/<source hash>/`` the first time it is needed. It needs an x86-64 CPU
with AVX-512 F/BW/VL and VNNI; elsewhere (or without a compiler) ``"auto"`` keeps ONNX Runtime's
kernels and says why (``OnnxCausalLM.kernels``), and ``"modelfold"`` raises ``UsageError``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from modelfold.errors import UsageError

KERNEL_CHOICES = ("auto", "modelfold", "onnxruntime")
KV_CACHES = ("float32", "float16")
DOMAIN = "ai.modelfold"
SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("vmath.h", "q4.h", "q4.c", "q8.h", "q8.c", "attn.h", "attn.c", "f32.h", "f32.c",
           "mem.h", "mem.c", "ort_ops.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c")
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c", "-fPIC",
          "-shared", "-fvisibility=hidden", "-std=c11", "-D_POSIX_C_SOURCE=200112L")
LIBRARY = "libmodelfold_ort.so"
BLOCK = 128  # the block size of the 4-bit kernel
FORMATS = {4: ("MatMulInt4", 128), 8: ("MatMulInt8", 32)}  # bits -> our op and its block size

_lock = threading.Lock()
_built: dict[str, Path] = {}


class KernelsUnavailable(Exception):
    """Why modelfold's kernels cannot run here (no compiler, a CPU without AVX-512 VNNI, ...)."""


def validate_choice(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise UsageError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}; got {kernels!r}")
    return kernels


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "gcc", "cc")):
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.cache
def _source_key(cflags: tuple[str, ...]) -> str:
    """The build's identity: the sources and the flags (read once per process)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(cflags).encode())
    return digest.hexdigest()[:16]


def library() -> Path:
    """The compiled custom-op library (built once per source version and cached on disk).

    Raises:
        KernelsUnavailable: not Linux x86-64, a CPU without the instructions the kernel needs,
            no C compiler, or the compiler failed (its message).
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelsUnavailable(f"they are built for Linux x86-64 (this is {platform.system()} "
                                 f"{platform.machine()})")
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise KernelsUnavailable(f"the CPU lacks {', '.join(missing)} (AVX-512 VNNI is needed)")
    compiler = _compiler()
    if compiler is None:
        raise KernelsUnavailable("no C compiler found (set $CC or install gcc)")
    key = _source_key(CFLAGS)
    with _lock:
        if key in _built:
            return _built[key]
        from modelfold.assets import cache_dir

        target = cache_dir() / "kernels" / key / LIBRARY
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            # compile to a private name, then rename: concurrent processes never see half a file
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / LIBRARY
                sources = [str(SOURCE_DIR / n) for n in SOURCES if n.endswith(".c")]
                cmd = [compiler, *CFLAGS, "-I", str(SOURCE_DIR), *sources, "-lm", "-o", str(built)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
                    raise KernelsUnavailable(f"compiling them failed ({Path(compiler).name}): "
                                             f"{first[:300]}")
                os.replace(built, target)
        _built[key] = target
        return target


def unavailable() -> str | None:
    """Why modelfold's kernels cannot run on this machine (None: they can; builds them)."""
    try:
        library()
    except KernelsUnavailable as exc:
        return str(exc)
    return None


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _eligible(node: onnx.NodeProto, constants: set[str]) -> str | None:
    """None when this MatMulNBits runs on MatMulInt4 / MatMulInt8, else why not."""
    attrs = _attributes(node)
    inputs = list(node.input) + [""] * (6 - len(node.input))
    bits = attrs.get("bits", 4)
    if bits not in FORMATS:
        return f"{bits}-bit weights"
    if attrs.get("block_size") != FORMATS[bits][1]:
        return (f"{bits}-bit blocks of {attrs.get('block_size')} (the kernel takes "
                f"{FORMATS[bits][1]})")
    if attrs.get("accuracy_level", 0) != 4:
        return f"accuracy_level {attrs.get('accuracy_level', 0)} (the kernel computes level 4)"
    if inputs[4]:
        return "g_idx (act-order) input"
    if any(i and i not in constants for i in inputs[1:4]):
        return "weights that are not initializers"
    return None


def rewrite(model: onnx.ModelProto) -> dict[str, Any]:
    """Rewrite ``model`` (loaded without its external data) in place for modelfold's kernels.

    Returns the facts: ``replaced`` / ``of`` (MatMulNBits nodes), ``swiglu`` (MLPs fused into the
    down projection), ``skip_norms`` (residual add + RMSNorm fused into the projection that reads
    them), ``kept`` (the reasons the other MatMulNBits nodes stay ONNX Runtime's),
    ``swiglu_ops`` (the other SwiGLU MLPs, each now one ``SwiGLU`` op), ``lm_head`` (float32
    products whose output is a graph output, the LM head, now ``MatMulF32``), ``matmul_f32`` (the
    other float32 ``MatMul`` nodes now ``MatMulF32``)."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    constants = set(initializers)
    small = {name: i for name, i in initializers.items() if not i.external_data}
    nodes = list(graph.node)
    position = {}  # node -> its index: nodes are compared by position, not by Python identity
    consumers: dict[str, list[int]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
        for name in node.output:
            producer[name] = node
            position[name] = i
    outputs = {o.name for o in graph.output}
    total, replaced, kept, removed = 0, 0, {}, set()
    swiglu = skip_norms = matmul_f32 = heads = 0
    for i, node in enumerate(nodes):
        float_b = _float_weight(node, initializers)
        if float_b is not None:  # a float32 MatMul of a constant [K, N]: MatMulF32, packed
            op, k, n, weights, extra = "MatMulF32", float_b.dims[0], float_b.dims[1], \
                [node.input[1]], {"trans_b": 0}
            if node.output[0] in outputs:
                heads += 1
            else:
                matmul_f32 += 1
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            total += 1
            reason = _eligible(node, constants)
            if reason:
                kept[reason] = kept.get(reason, 0) + 1
                continue
            attrs = _attributes(node)
            inputs = list(node.input) + [""] * (6 - len(node.input))
            op, k, n, extra = FORMATS[attrs.get("bits", 4)][0], attrs["K"], attrs["N"], {}
            weights = [inputs[1], inputs[2], inputs[3], inputs[5]]  # B, scales, zero points, bias
            replaced += 1
        else:
            continue
        norm = _skip_norm(node.input[0], producer, consumers, outputs)
        fused = None if norm else _swiglu_source(node.input[0], k, producer, consumers,
                                                 outputs, small)
        if norm is not None:  # the fused node takes the norm's place (its inputs exist there)
            x, skip, gamma = norm.input[:3]
            new = helper.make_node(
                op, [x, *weights, skip, gamma],
                [node.output[0], norm.output[3] if len(norm.output) > 3 else ""],
                name=node.name, domain=DOMAIN, K=k, N=n, activation=2,
                epsilon=float(_attributes(norm).get("epsilon", 1e-5)), **extra)
            norm.CopyFrom(new)
            removed.add(i)
            skip_norms += 1
        else:
            source, activation = node.input[0], 0
            if fused is not None:
                source, dropped = fused
                activation = 1
                removed.update(position[d.output[0]] for d in dropped)
                swiglu += 1
            node.CopyFrom(helper.make_node(op, [source, *weights], list(node.output),
                                           name=node.name, domain=DOMAIN, K=k, N=n,
                                           activation=activation, **extra))
    swiglu_ops = 0  # the SwiGLU MLPs left (down projections that are not ours): one op each
    infos = [v for v in [*graph.value_info, *graph.input, *graph.output]
             if v.type.HasField("tensor_type")]
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in infos
             if v.type.tensor_type.HasField("shape")}
    floats = {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for i, node in enumerate(nodes):
        if i in removed or node.op_type != "Mul":
            continue
        fused = _swiglu_source(node.output[0], None, producer, consumers, outputs, small,
                               standalone=True, ranks=ranks)
        if fused is None or fused[0] not in floats:  # the op is float32 (not float16 graphs)
            continue
        source, (split, gelu, _) = fused
        removed.update((position[split.output[0]], position[gelu.output[0]]))
        node.CopyFrom(helper.make_node("SwiGLU", [source], list(node.output), name=node.name,
                                       domain=DOMAIN))
        swiglu_ops += 1
    heads += _lm_heads(graph, initializers, removed)
    if removed:
        keep = []
        for i, node in enumerate(nodes):
            if i not in removed:
                keep.append(onnx.NodeProto())
                keep[-1].CopyFrom(node)
        del graph.node[:]
        graph.node.extend(keep)
    if (replaced or swiglu_ops or heads or matmul_f32) and \
            not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return {"replaced": replaced, "of": total, "swiglu": swiglu, "skip_norms": skip_norms,
            "kept": kept, "swiglu_ops": swiglu_ops, "lm_head": heads, "matmul_f32": matmul_f32}


def _float_weight(node: onnx.NodeProto,
                  initializers: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    """The float32 [K, N] initializer a plain ``MatMul`` multiplies by, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    return _float_matrix(initializers, node.input[1])


def _float_matrix(initializers: dict[str, onnx.TensorProto], name: str) -> onnx.TensorProto | None:
    """The initializer ``name`` where it is a non-empty float32 matrix, else None."""
    b = initializers.get(name)
    if b is None or b.data_type != onnx.TensorProto.FLOAT or len(b.dims) != 2 or 0 in b.dims:
        return None
    return b


def _lm_heads(graph: onnx.GraphProto, weights: dict[str, onnx.TensorProto],
              removed: set[int]) -> int:
    """A ``FusedMatMul`` of a constant float32 weight (``transB``: a tied table, which the
    embedding ``Gather`` reads too) whose output is a graph output (the LM head) becomes
    ``ai.modelfold::MatMulF32``: a GEMV for the few rows a generation step asks for, reading the
    table where it lies (``csrc/f32.c``); with ``transB`` 0 the weight is packed like a
    ``MatMul``'s. Returns how many."""
    outputs = {o.name for o in graph.output}
    done = 0
    for i, node in enumerate(graph.node):
        if i in removed or node.output[0] not in outputs or len(node.input) != 2 or \
                node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
            continue
        attrs = _attributes(node)
        if attrs.get("alpha", 1.0) != 1.0 or any(attrs.get(a, 0) for a in
                                                 ("transA", "transBatchA", "transBatchB")):
            continue
        trans_b = int(attrs.get("transB", 0))
        b = _float_matrix(weights, node.input[1])
        if b is None:
            continue
        k, n = (b.dims[1], b.dims[0]) if trans_b else (b.dims[0], b.dims[1])
        node.CopyFrom(helper.make_node("MatMulF32", list(node.input), list(node.output),
                                       name=node.name, domain=DOMAIN, K=k, N=n, trans_b=trans_b))
        done += 1
    return done


ATTENTION_OPS = {"float32": "CachedAttention", "float16": "CachedAttentionF16"}
_GQA_UNUSED = {9: "position_ids", 10: "attention_bias", 11: "head_sink", 12: "k_scale (a quantized cache)",
               13: "v_scale (a quantized cache)", 14: "q_norm_weight", 15: "k_norm_weight",
               16: "query_seqlens"}


def _attention_eligible(node: onnx.NodeProto, graph_inputs: dict, graph_outputs: set[str],
                        consumers: dict) -> str | None:
    """None when this GroupQueryAttention runs on CachedAttention, else why not."""
    attrs = _attributes(node)
    inputs = list(node.input) + [""] * (17 - len(node.input))
    for index, what in _GQA_UNUSED.items():
        if inputs[index]:
            return f"a {what} input"
    if attrs.get("rotary_interleaved", 0):
        return "interleaved rotary embedding"
    if attrs.get("smooth_softmax", -1) > 0 or attrs.get("qk_output", 0):
        return "smooth softmax or a QK output"
    if attrs.get("do_rotary", 0) and not (inputs[7] and inputs[8]):
        return "rotary embedding without cos / sin tables"
    past = inputs[3:5]
    if not all(past) or any(n not in graph_inputs for n in past):
        return "a past cache that is not a graph input"
    if any(len(consumers.get(n, [])) != 1 for n in past):
        return "a past cache other nodes read"
    present = list(node.output[1:3])
    if len(present) != 2 or any(n not in graph_outputs or consumers.get(n) for n in present):
        return "a present cache that is not a graph output or that other nodes read"
    kind = graph_inputs[past[0]].type.tensor_type
    if kind.elem_type != onnx.TensorProto.FLOAT:
        return f"a {onnx.TensorProto.DataType.Name(kind.elem_type).lower()} cache"
    dims = kind.shape.dim
    if len(dims) != 4 or not dims[3].dim_value or dims[3].dim_value % 16:
        return "a head size that is not a known multiple of 16"
    return None


def rewrite_attention(model: onnx.ModelProto, cache: str) -> dict[str, Any]:
    """``GroupQueryAttention`` -> ``ai.modelfold::CachedAttention`` (``cache`` "float32") or
    ``CachedAttentionF16`` ("float16": the past / present inputs and outputs become float16), in
    place. Returns ``attention`` / ``attention_of``, ``attention_kept`` (reasons) and
    ``tiled_keys`` (the past / present key names now in the kernel's layout)."""
    graph = model.graph
    graph_inputs = {i.name: i for i in graph.input}
    graph_outputs = {o.name: o for o in graph.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)
    total = replaced = 0
    kept: dict[str, int] = {}
    retyped: set[str] = set()
    tiled: list[str] = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        total += 1
        reason = _attention_eligible(node, graph_inputs, set(graph_outputs), consumers)
        if reason:
            kept[reason] = kept.get(reason, 0) + 1
            continue
        attrs = _attributes(node)
        inputs = (list(node.input) + [""] * 9)[:9]
        if not attrs.get("do_rotary", 0):
            inputs[7] = inputs[8] = ""
        while inputs and not inputs[-1]:
            inputs.pop()
        window = attrs.get("local_window_size", -1)
        node.CopyFrom(helper.make_node(
            ATTENTION_OPS[cache], inputs, list(node.output[:3]), name=node.name, domain=DOMAIN,
            num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"],
            scale=float(attrs.get("scale", 0.0)), softcap=float(attrs.get("softcap", 0.0)),
            local_window_size=window))
        if cache == "float16":
            retyped.update([*inputs[3:5], *node.output[1:3]])
        tiled.extend([inputs[3], node.output[1]])
        replaced += 1
    for value in [*graph.input, *graph.output]:
        if value.name in retyped:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    if retyped:
        keep = [v for v in graph.value_info if v.name not in retyped]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    if replaced and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return {"attention": replaced, "attention_of": total, "attention_kept": kept,
            "tiled_keys": tiled}


def _skip_norm(name: str, producer: dict, consumers: dict,
               outputs: set[str]) -> onnx.NodeProto | None:
    """The ``SkipSimplifiedLayerNormalization`` (no bias) whose normalized output is ``name`` and
    is read by one node only, its statistics outputs unread (its sum may be read)."""
    norm = producer.get(name)
    if norm is None or norm.op_type != "SkipSimplifiedLayerNormalization" or \
            norm.domain != "com.microsoft" or norm.output[0] != name:
        return None
    if len(norm.input) > 3 and norm.input[3] or len(norm.input) < 3:
        return None  # a bias input
    if name in outputs or len(consumers.get(name, [])) != 1:
        return None
    for stat in list(norm.output[1:3]):
        if stat and (stat in outputs or consumers.get(stat)):
            return None
    return norm


def _swiglu_source(name: str, width: int | None, producer: dict, consumers: dict,
                   outputs: set[str], small: dict[str, onnx.TensorProto],
                   standalone: bool = False, ranks: dict[str, int] | None = None,
                   ) -> tuple[str, list] | None:
    """``Mul(QuickGelu(a, alpha=1), b)`` with ``a, b = Split(x)`` into two halves (of ``width``
    when given) on the last axis, nothing else reading the intermediates (nor, unless
    ``standalone``, the Mul's output, which a fused reader replaces): returns ``x`` and the three
    nodes. ``ranks``: the ranks the graph's value infos give (a Split on axis 2 splits the last
    axis of a rank-3 tensor only)."""
    ranks = ranks or {}
    mul = producer.get(name)
    if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
        return None
    gelu = producer.get(mul.input[0])
    if gelu is None or gelu.op_type != "QuickGelu" or gelu.domain != "com.microsoft" or \
            abs(_attributes(gelu).get("alpha", 1.702) - 1.0) > 0:
        return None
    split = producer.get(gelu.input[0])
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") or \
            list(split.output) != [gelu.input[0], mul.input[1]]:
        return None
    axis = _attributes(split).get("axis", 0)
    if axis != -1 and axis != (2 if width is not None else ranks.get(split.input[0], 0) - 1):
        return None  # the last axis (a down projection's input is [B, S, 2 K])
    sizes = split.input[1] if len(split.input) > 1 else ""
    if sizes:  # the sizes must be a constant [w, w]
        if sizes not in small:
            return None
        halves = onnx.numpy_helper.to_array(small[sizes]).tolist()
        if len(halves) != 2 or halves[0] != halves[1] or (width is not None and halves[0] != width):
            return None
    elif _attributes(split).get("num_outputs", 2) != 2:
        return None
    intermediates = [*split.output, gelu.output[0]] + ([] if standalone else [mul.output[0]])
    if any(n in outputs or len(consumers.get(n, [])) != 1 for n in intermediates):
        return None
    return split.input[0], [split, gelu, mul]


def validate_cache(kv_cache: str) -> str:
    if kv_cache not in KV_CACHES:
        raise UsageError(f"kv_cache must be one of {', '.join(KV_CACHES)}; got {kv_cache!r}")
    return kv_cache


def prepare(path: Path, kernels: str,
            kv_cache: str = "float32") -> tuple[bytes | None, Path | None, dict[str, Any]]:
    """What a session for ``path`` needs: the rewritten model's bytes and the library (both None
    when ONNX Runtime's kernels are used), and the facts (``OnnxCausalLM.kernels``; its
    ``tiled_keys`` names the past / present keys in the attention kernel's layout).

    ``kv_cache`` "float16" stores the cache of the attention kernel in float16 (half the memory
    and the bytes a decode step reads); it needs modelfold's attention kernel."""
    validate_choice(kernels)
    validate_cache(kv_cache)
    if kernels == "onnxruntime":
        if kv_cache != "float32":
            raise UsageError(f"kv_cache={kv_cache!r} is modelfold's attention kernel's; "
                             "it does not run with kernels='onnxruntime'")
        return None, None, {"kernels": "onnxruntime", "reason": "kernels='onnxruntime'"}
    model = onnx.load(str(path), load_external_data=False)
    facts = rewrite(model)
    facts.update(rewrite_attention(model, kv_cache))
    if kv_cache != "float32" and not facts["attention"]:
        kept = "; ".join(f"{n} x {r}" for r, n in facts["attention_kept"].items())
        raise UsageError(f"kv_cache={kv_cache!r}: {path} has no GroupQueryAttention that modelfold's "
                         f"attention kernel takes{f' ({kept})' if kept else ''}")
    if not any(facts[k] for k in ("replaced", "attention", "swiglu_ops", "lm_head", "matmul_f32")):
        why = ("no MatMulNBits node, float32 MatMul, GroupQueryAttention, SwiGLU MLP or LM head "
               "the kernels take") + (
            f" ({'; '.join(f'{n} x {r}' for r, n in facts['kept'].items())})" if facts["kept"] else "")
        if kernels == "modelfold":
            raise UsageError(f"kernels='modelfold': {path} has {why}; modelfold's kernels run "
                             "4-bit MatMulNBits in blocks of 128 or 8-bit in blocks of 32 at "
                             "accuracy_level 4, "
                             "GroupQueryAttention over a float cache, SwiGLU MLPs and float32 "
                             "MatMuls of constant weights")
        return None, None, {"kernels": "onnxruntime", "reason": why, **facts}
    try:
        lib = library()
    except KernelsUnavailable as exc:
        if kernels == "modelfold" or kv_cache != "float32":
            raise UsageError(f"kernels='modelfold': modelfold's kernels cannot run here: {exc}; "
                             "use kernels='onnxruntime'") from None
        return None, None, {"kernels": "onnxruntime", "reason": str(exc)}
    return model.SerializeToString(), lib, {"kernels": "modelfold", "library": str(lib),
                                            "kv_cache": kv_cache, **facts}


def to_kernel_layout(keys: np.ndarray) -> np.ndarray:
    """A key cache [B, H, P, D] in the attention kernel's layout (``csrc/attn.h``): the first
    P // 16 * 16 positions in tiles of 16 positions transposed ([tile][D][16]), then the rest by
    position. Same shape and dtype; values are stored by position (no conversion)."""
    b, h, p, d = keys.shape
    tiled = p // 16 * 16
    out = np.empty_like(keys)
    flat = out.reshape(b, h, p * d)
    tiles = keys[:, :, :tiled].reshape(b, h, tiled // 16, 16, d).transpose(0, 1, 2, 4, 3)
    flat[:, :, :tiled * d] = tiles.reshape(b, h, tiled * d)
    flat[:, :, tiled * d:] = keys[:, :, tiled:].reshape(b, h, (p - tiled) * d)
    return out


def from_kernel_layout(keys: np.ndarray) -> np.ndarray:
    """The inverse of ``to_kernel_layout``: keys [B, H, P, D] by position."""
    b, h, p, d = keys.shape
    tiled = p // 16 * 16
    flat = np.ascontiguousarray(keys).reshape(b, h, p * d)
    out = np.empty_like(keys)
    out[:, :, :tiled] = flat[:, :, :tiled * d].reshape(b, h, tiled // 16, d, 16).transpose(
        0, 1, 2, 4, 3).reshape(b, h, tiled, d)
    out[:, :, tiled:] = flat[:, :, tiled * d:].reshape(b, h, p - tiled, d)
    return out
