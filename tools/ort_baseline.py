"""ONNX Runtime's own weight-only quantizer as the baseline: fp32 artifact -> ORT-quantized artifact.

    .venv/bin/python tools/ort_baseline.py quantize SRC OUT --method default|rtn|gptq|hqq
        [--bits 4] [--block-size 128] [--symmetric] [--accuracy-level 0|4]
        [--calib-samples 128] [--seq-len 512] [--gptq-driver one-pass|ort] [--json]
    .venv/bin/python tools/ort_baseline.py accuracy-level SRC OUT LEVEL
    .venv/bin/python tools/ort_baseline.py bench DIR [DIR ...] [--chars 200000] [--runs 5]

`quantize` runs `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` on the
`model.onnx` of a modelfold artifact (e.g. `modelfold convert ... -o /tmp/fp32art`) and writes a
new artifact folder that `OnnxCausalLM` / `modelfold eval` / `modelfold generate` load as usual:
the quantized `model.onnx` + `model.onnx.data`, every other file of the source folder, and a
`modelfold.json` whose `quantization` entry records the quantizer, its config and the wall time.

Methods (all ORT code; what each one does to a weight block):

- `default`: `DefaultWeightOnlyQuantConfig`, ORT's C++ block quantizer (round to nearest,
  min/max range that always includes 0). This is what `MatMulNBitsQuantizer(model)` does with no
  `algo_config`.
- `rtn`: `RTNWeightOnlyQuantConfig`, the Python RTN of ORT's vendored Intel Neural Compressor
  code (`onnxruntime.quantization.neural_compressor`; no `neural-compressor` package needed);
  min/max range of the block without forcing 0 in.
- `gptq`: `GPTQWeightOnlyQuantConfig` with a calibration reader that feeds the KV-cache decoder
  `calib_samples` windows of `seq_len` corpus tokens and an empty past.
- `hqq`: `HQQWeightOnlyQuantConfig` (half-quadratic optimization of scale/zero; needs torch).

ORT's GPTQ driver (`gptq_quantize`) runs the whole fp32 model once per distinct MatMul input per
calibration sample: 120 inputs on SmolLM2-135M, about 1.5-3 s per 512-token forward on 2 cores,
so 128 x 512 would take 6-12 hours. `gptq_driver="one-pass"` (the default) collects the same
Hessians in ONE forward per sample (all 120 activations as extra outputs, the same float64
accumulation, in the same order) and then calls ORT's own `gptq()`, `quant_tensor()` and
`make_matmul_weight_only_node()`. ORT's loop also calibrates on the unquantized model, so the
result is the same bytes (checked: 2 x 64 tokens, all 704 initializers byte-identical);
`gptq_driver="ort"` runs ORT's unmodified driver.

Two ORT 1.32 defects this baseline has to live with (measured on SmolLM2-135M):

- ORT's `gptq()` never propagates the quantization error: it takes the upper Cholesky factor U
  of H^-1 but reads its lower part (`Hinv1[i:, i]`, `Hinv[i2:, i1:i2]`, all zeros except the
  diagonal). Its output is identical for any Hessian (H from 128 x 512 tokens == H = I), so ORT's
  "GPTQ" is a calibration-independent RTN on GPTQ's grid (min/max including 0), re-quantized by
  `quant_tensor`. The calibration pass still runs (and costs most of the time).
- The vendored RTN/GPTQ packer (`make_matmul_weight_only_node`) cannot pack asymmetric 4-bit
  zero points when K / block_size rounds up to an odd number of blocks (K=576 at block 128:
  5 blocks): "cannot reshape array of size 480 into shape (192,newaxis)". `fix_zero_points`
  (default on) swaps in a per-row packer for the duration of the call; where ORT's packer works
  its bytes are identical. `method="default"` (C++ packer) is not affected.

ORT quantizes only `MatMul` nodes whose B input is a constant 2-D initializer. On a modelfold
SmolLM2 artifact that is all 210 projection MatMuls; the tied LM head (`com.microsoft.FusedMatMul`
with transB=1 over the embedding table) and the embedding `Gather` stay fp32. The result's
`unquantized` list names them with their bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
METHODS = ("default", "rtn", "gptq", "hqq")
GPTQ_DRIVERS = ("one-pass", "ort")
_ACCURACY_LEVELS = (None, 0, 1, 2, 3, 4)
_QUANTIZER = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"
# Weights below this many elements are biases/norm scales, not candidates for quantization.
_MIN_WEIGHT_ELEMENTS = 4096


# --------------------------------------------------------------------------------------------
# Calibration data for a KV-cache decoder
# --------------------------------------------------------------------------------------------
def _calibration_reader_class() -> type:
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class DecoderCalibrationReader(CalibrationDataReader):
        """Feeds token windows to a modelfold KV-cache decoder with an empty past.

        Each item is one window: input_ids / position_ids [1, S], attention_mask [1, S] and
        2 * num_layers past tensors of shape [1, H, 0, D] (H = KV heads, D = head dim).
        ORT deep-copies the reader before iterating, so it must start at item 0.
        """

        def __init__(self, windows: np.ndarray, past_names: list[str], past_shape: tuple[int, int]):
            self.windows = np.asarray(windows, dtype=np.int64)  # [N, S]
            self.past_names = past_names
            self.past_shape = past_shape  # (H, D)
            self._next = 0

        def __len__(self) -> int:
            return len(self.windows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= len(self.windows):
                return None
            ids = self.windows[self._next : self._next + 1]  # [1, S]
            self._next += 1
            heads, dim = self.past_shape
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
            }
            empty = np.zeros((1, heads, 0, dim), dtype=np.float32)
            feeds.update({name: empty for name in self.past_names})
            return feeds

        def rewind(self) -> None:
            self._next = 0

    return DecoderCalibrationReader


def calibration_reader(
    src_artifact_dir: str | Path, *, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> Any:
    """A `CalibrationDataReader` over `calibration_batches` windows for the artifact's decoder."""
    from transformers import AutoTokenizer

    from modelfold.corpus import calibration_batches

    src = Path(src_artifact_dir)
    graph = onnx.load(str(src / MODEL_FILE), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    if not past:
        raise ValueError(f"{src} is not a KV-cache decoder artifact (no past_key_values inputs)")
    dims = past[0].type.tensor_type.shape.dim  # [B, H, P, D]
    past_shape = (dims[1].dim_value, dims[3].dim_value)
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows = calibration_batches(tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return _calibration_reader_class()(windows.numpy(), [i.name for i in past], past_shape)


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------
def ort_quantize(
    src_artifact_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "default",
    bits: int = 4,
    block_size: int = 128,
    symmetric: bool = False,
    accuracy_level: int | None = None,
    calib_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    percdamp: float = 0.01,
    actorder: bool = False,
    mse: bool = False,
    perchannel: bool = True,
    gptq_driver: str = "one-pass",
    fix_zero_points: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantizes an fp32 modelfold artifact with ONNX Runtime's `MatMulNBitsQuantizer`.

    Args:
        src_artifact_dir: Artifact folder with `model.onnx` (+ `.data`) and `modelfold.json`.
        out_dir: Artifact folder to create (written under a temporary name, renamed at the end).
        method: "default", "rtn", "gptq" or "hqq" (see the module docstring).
        bits: 4 (every method) or 8/2 ("default" only; ORT's RTN/GPTQ path is 4-bit only).
        block_size: Quantization group along K (power of 2, >= 16). For GPTQ it is also the
            column block of the GPTQ sweep (ORT's `GPTQWeightOnlyQuantConfig.block_size`).
        symmetric: Symmetric blocks (no zero points) instead of asymmetric.
        accuracy_level: MatMulNBits `accuracy_level` attribute (None/0: unset; 4: int8
            activations inside the kernel). Only an attribute: the weight bytes do not depend on it.
        calib_samples, seq_len, seed: GPTQ calibration windows from the wikipedia calibration split.
        percdamp, actorder, mse, perchannel: GPTQ options, passed to ORT unchanged.
        gptq_driver: "one-pass" (Hessians in one forward per sample) or "ort" (ORT's own loop).
        fix_zero_points: For "rtn"/"gptq" with asymmetric 4-bit blocks, pack the zero points per
            row (see `_make_matmul_nbits_node`). False runs ORT's packer, which raises
            ValueError whenever K / block_size rounds up to an odd block count.
        overwrite: Replace an existing `out_dir`.
        progress: Show progress bars (on stderr).

    Returns:
        {"out_dir", "bytes", "seconds", "timings", "config", "quantized", "unquantized", "probe"}.
    """
    from modelfold.artifact import MANIFEST, read_manifest
    from modelfold.assets import atomic_output

    src, out = Path(src_artifact_dir), Path(out_dir)
    config = _validated_config(
        method,
        bits,
        block_size,
        symmetric,
        accuracy_level,
        calib_samples,
        seq_len,
        seed,
        percdamp,
        actorder,
        mse,
        perchannel,
        gptq_driver,
    )
    if method in ("rtn", "gptq") and not symmetric:
        config["zero_point_packing"] = "per-row (fixed)" if fix_zero_points else "onnxruntime"
    manifest = read_manifest(src)
    if not (src / MODEL_FILE).is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {src}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder '{out}' already exists; pass overwrite=True")
    if out.resolve() == src.resolve():
        raise ValueError("out_dir must differ from src_artifact_dir")

    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _quiet_ort_logging(), _zero_point_packing_fixed(fix_zero_points):
        tick = time.perf_counter()
        model = onnx.load(str(src / MODEL_FILE))  # with external data
        timings["load"] = time.perf_counter() - tick
        reader = None
        if method == "gptq":
            tick = time.perf_counter()
            reader = calibration_reader(src, n_samples=calib_samples, seq_len=seq_len, seed=seed)
            timings["calibration_data"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if method == "gptq" and gptq_driver == "one-pass":
            model = _gptq_one_pass(model, reader, config, progress=progress, timings=timings)
        else:
            model = _run_ort_quantizer(model, config, reader, progress=progress)
        timings["quantize"] = time.perf_counter() - tick

    with atomic_output(out) as tmp:
        tmp.mkdir()
        tick = time.perf_counter()
        _save_model(model, tmp / MODEL_FILE)
        timings["save"] = time.perf_counter() - tick
        seconds = time.perf_counter() - start
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name not in (MODEL_FILE, DATA_FILE, MANIFEST):
                shutil.copy2(p, tmp / p.name)
        graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False).graph
        facts = describe_quantization(graph, tmp)
        probe = _probe(src / MODEL_FILE, tmp / MODEL_FILE)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        onnx_bytes = files[MODEL_FILE] + files.get(DATA_FILE, 0)
        quantization = {
            "tool": _QUANTIZER,
            "onnxruntime": _ort_version(),
            "config": config,
            "source_artifact": str(src.resolve()),
            "source_onnx_bytes": manifest.get("onnx_bytes"),
            "source_parity": manifest.get("parity"),
            "seconds": round(seconds, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "quantized": facts["quantized"],
            "unquantized": facts["unquantized"],
            "probe": probe,
        }
        new_manifest = {
            **manifest,
            "created": _now(),
            "onnx_bytes": onnx_bytes,
            "parity": {},
            "quantization": quantization,
            "files": files,
        }
        new_manifest["onnx"] = {
            **manifest.get("onnx", {}),
            **_graph_counts(graph),
            "files": {k: v for k, v in files.items() if k.startswith(MODEL_FILE)},
        }
        (tmp / MANIFEST).write_text(json.dumps(new_manifest, indent=2, default=str))
    return {
        "out_dir": str(out),
        "bytes": onnx_bytes,
        "seconds": seconds,
        "timings": timings,
        "config": config,
        **facts,
        "probe": probe,
    }


def with_accuracy_level(
    src_artifact_dir: str | Path,
    out_dir: str | Path,
    level: int,
    *,
    overwrite: bool = False,
    link_data: bool = False,
    require_nodes: bool = True,
) -> dict[str, Any]:
    """Copies a MatMulNBits artifact, setting every MatMulNBits node's `accuracy_level`.

    The quantizers write `accuracy_level` only as an attribute (the weight bytes do not depend
    on it), so this gives the artifact the quantizer would have written with that level,
    without re-running GPTQ. The data file is copied unchanged (`link_data`: hard-linked, for
    benchmarks that make many variants). `require_nodes=False` accepts artifacts without
    MatMulNBits nodes (fp32, W8A8), which are then copied as they are.
    """
    from modelfold.artifact import MANIFEST, read_manifest
    from modelfold.assets import atomic_output

    if level not in (0, 1, 2, 3, 4):
        raise ValueError(f"level must be 0..4, got {level!r}")
    src, out = Path(src_artifact_dir), Path(out_dir)
    manifest = read_manifest(src)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder '{out}' already exists; pass overwrite=True")
    model = onnx.load(str(src / MODEL_FILE), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if level:  # ORT's quantizers leave the attribute out for 0
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
            changed += 1
    if not changed and require_nodes:
        raise ValueError(f"{src} has no MatMulNBits nodes")
    if out.exists():
        shutil.rmtree(out)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name not in (MODEL_FILE, MANIFEST):
                (os.link if link_data else shutil.copy2)(p, tmp / p.name)
        onnx.save_model(model, str(tmp / MODEL_FILE))  # external data references stay valid
        quantization = copy.deepcopy(manifest.get("quantization", {}))
        quantization.setdefault("config", {})["accuracy_level"] = level
        quantization["accuracy_level_rewritten_from"] = str(src.resolve())
        (tmp / MANIFEST).write_text(
            json.dumps({**manifest, "created": _now(), "quantization": quantization}, indent=2, default=str)
        )
    return {"out_dir": str(out), "nodes": changed, "accuracy_level": level}


def _validated_config(
    method,
    bits,
    block_size,
    symmetric,
    accuracy_level,
    calib_samples,
    seq_len,
    seed,
    percdamp,
    actorder,
    mse,
    perchannel,
    gptq_driver,
) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if bits not in (2, 4, 8) or (method != "default" and bits != 4):
        raise ValueError(
            f"bits={bits!r}: ORT supports 2/4/8 bits with method='default' and only 4 with {method!r}"
        )
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 >= 16, got {block_size!r}")
    if accuracy_level not in _ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be None or 0..4, got {accuracy_level!r}")
    if method == "hqq" and (symmetric or accuracy_level):
        raise ValueError("method='hqq' has no symmetric or accuracy_level option in ORT")
    if gptq_driver not in GPTQ_DRIVERS:
        raise ValueError(f"gptq_driver must be one of {GPTQ_DRIVERS}, got {gptq_driver!r}")
    config: dict[str, Any] = {
        "method": method,
        "bits": bits,
        "block_size": block_size,
        "symmetric": bool(symmetric),
        "accuracy_level": accuracy_level or 0,
    }
    if method == "gptq":
        for name, value in (("calib_samples", calib_samples), ("seq_len", seq_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")
        config.update(
            calib_samples=calib_samples,
            seq_len=seq_len,
            seed=seed,
            corpus="wikipedia:calibration",
            percdamp=percdamp,
            actorder=actorder,
            mse=mse,
            perchannel=perchannel,
            gptq_driver=gptq_driver,
        )
    return config


def _run_ort_quantizer(
    model: onnx.ModelProto, config: dict[str, Any], reader: Any, *, progress: bool
) -> onnx.ModelProto:
    """`MatMulNBitsQuantizer(...).process()`, unmodified."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    method, level = config["method"], config["accuracy_level"] or None
    if method == "default":
        algo = mnq.DefaultWeightOnlyQuantConfig(
            block_size=config["block_size"],
            is_symmetric=config["symmetric"],
            accuracy_level=level,
            bits=config["bits"],
        )
    elif method == "rtn":
        algo = mnq.RTNWeightOnlyQuantConfig()
    elif method == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=config["block_size"], bits=config["bits"])
    else:
        algo = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader,
            percdamp=config["percdamp"],
            block_size=config["block_size"],
            actorder=config["actorder"],
            mse=config["mse"],
            perchannel=config["perchannel"],
        )
    # RTN and GPTQ read group size, scheme and accuracy level from the quantizer's arguments.
    quantizer = mnq.MatMulNBitsQuantizer(
        model,
        bits=config["bits"],
        block_size=config["block_size"],
        is_symmetric=config["symmetric"],
        accuracy_level=level,
        algo_config=algo,
    )
    if quantizer.node_quantizer is not None:  # default / hqq: one call per node
        total = sum(1 for n in model.graph.node if n.op_type in algo.op_types_to_quantize)
        bar = tqdm(total=total, desc=f"ORT {method}", unit="node", disable=not progress)
        quantize_node = quantizer.node_quantizer.quantize

        def counted(node, graph_stack):
            bar.update(1)
            return quantize_node(node, graph_stack)

        quantizer.node_quantizer.quantize = counted
        quantizer.process()
        bar.close()
    else:  # rtn / gptq: ORT prints its own progress bar on stdout; keep stdout clean
        with contextlib.redirect_stdout(sys.stderr):
            quantizer.process()
        print(file=sys.stderr)
    return quantizer.model.model


def _gptq_one_pass(
    model: onnx.ModelProto, reader: Any, config: dict[str, Any], *, progress: bool, timings: dict[str, float]
) -> onnx.ModelProto:
    """ORT's `gptq_quantize` with the Hessians collected in one forward per calibration sample.

    Same targets, same float64 Hessian recurrence in the same order, then ORT's own `gptq()`,
    `quant_tensor()` and `make_matmul_weight_only_node()` per MatMul.
    """
    import onnxruntime as ort
    from onnxruntime.quantization.neural_compressor import weight_only as wo

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = [
        n
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]
    inputs = sorted({n.input[0] for n in targets})

    tick = time.perf_counter()
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    augmented.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs)
    session = ort.InferenceSession(
        augmented.SerializeToString(), ort.SessionOptions(), providers=["CPUExecutionProvider"]
    )
    del augmented
    hessians: dict[str, np.ndarray] = {}
    nsamples = 0
    for feeds in tqdm(
        copy.deepcopy(reader), total=len(reader), desc="GPTQ Hessians", unit="sample", disable=not progress
    ):
        acts = session.run(inputs, feeds)
        for name, inp in zip(inputs, acts):
            tmp = inp.shape[0]  # exactly ORT's recurrence (weight_only.gptq_quantize)
            inp = np.reshape(inp, (-1, inp.shape[-1]))
            h = hessians.get(name)
            if h is None:
                h = np.zeros((inp.shape[1], inp.shape[1]))
            h = h * (nsamples / (nsamples + tmp))
            inp = np.sqrt(2 / (nsamples + tmp)) * inp
            hessians[name] = h + np.matmul(inp.T, inp)
        nsamples += tmp
    del session
    timings["hessians"] = time.perf_counter() - tick

    tick = time.perf_counter()
    num_bits, group_size = config["bits"], config["block_size"]
    scheme = "sym" if config["symmetric"] else "asym"
    replaced: dict[int, onnx.NodeProto] = {}
    new_inits: list[onnx.TensorProto] = []
    for node in tqdm(targets, desc="GPTQ weights", unit="MatMul", disable=not progress):
        weight = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()  # [K, N]
        q_weight = wo.gptq(
            weight,
            hessians[node.input[0]].copy(),
            num_bits=num_bits,
            group_size=group_size,
            scheme=scheme,
            blocksize=group_size,
            percdamp=config["percdamp"],
            actorder=config["actorder"],
            mse=config["mse"],
            perchannel=config["perchannel"],
        )
        k_blocks = (weight.shape[0] + group_size - 1) // group_size
        q_weight = wo.pad_tensor(q_weight, group_size, k_blocks)
        q_weight, scale, zp = wo.quant_tensor(q_weight.T, num_bits, group_size, scheme, "uint")
        q_node, q_inits = wo.make_matmul_weight_only_node(
            node=node,
            weight_shape=weight.shape,
            num_bits=num_bits,
            group_size=group_size,
            k_blocks=k_blocks,
            q_weight=q_weight.astype("uint8"),
            scale=scale.astype(weight.dtype),
            zero_point=zp if scheme == "asym" else None,
            accuracy_level=config["accuracy_level"],
        )
        replaced[id(node)] = q_node
        new_inits.extend(q_inits)
    timings["gptq"] = time.perf_counter() - tick

    nodes = [replaced.get(id(n), n) for n in graph.node]  # same inputs/outputs: order stays valid
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def _make_matmul_nbits_node(
    node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, zero_point, accuracy_level=0
):
    """ORT's `make_matmul_weight_only_node` with the zero points packed per row.

    ORT 1.32 packs the 4-bit zero points of all rows as one flat nibble stream and then reshapes
    it to [N, -1]. MatMulNBits wants [N, ceil(k_blocks / 2)], each row padded on its own. The two
    agree when k_blocks is even; when it is odd (K=576 at block 128 -> 4.5 -> 5 blocks, every
    SmolLM2 attention/gate/up projection) ORT raises "cannot reshape array of size 480 into
    shape (192,newaxis)". Bytes are identical to ORT's whenever ORT's own packing works.
    """
    if zero_point is None or num_bits != 4:  # 8-bit zero points: one byte each, ORT is right
        return _ORT_MAKE_NODE(
            node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, zero_point, accuracy_level
        )
    q_node, inits = _ORT_MAKE_NODE(
        node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, None, accuracy_level
    )  # inits: [scale, B]
    zp = np.asarray(zero_point, dtype=np.uint8).reshape(weight_shape[1], k_blocks)  # [N, kb]
    if k_blocks % 2:
        zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=8)  # ORT pads with 0x8 nibbles
    packed = (zp[:, ::2] | (zp[:, 1::2] << 4)).astype(np.uint8)  # [N, ceil(kb / 2)]
    zp_tensor = onnx.helper.make_tensor(
        node.input[1] + "_zp", onnx.TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True
    )
    q_node.input.insert(3, zp_tensor.name)  # inputs: A, B, scales, zero_points
    return q_node, [inits[0], zp_tensor, inits[1]]  # ORT's order: scale, zp, B


_ORT_MAKE_NODE: Any = None  # ORT's own packer while _zero_point_packing_fixed is active


@contextlib.contextmanager
def _zero_point_packing_fixed(enabled: bool):
    """Swaps `_make_matmul_nbits_node` into ORT's vendored INC module for the block's duration.

    `rtn_quantize` and `gptq_quantize` look the packer up as a module global at call time.
    """
    global _ORT_MAKE_NODE
    from onnxruntime.quantization.neural_compressor import weight_only as wo

    original = wo.make_matmul_weight_only_node
    _ORT_MAKE_NODE = original
    if enabled:
        wo.make_matmul_weight_only_node = _make_matmul_nbits_node
    try:
        yield
    finally:
        wo.make_matmul_weight_only_node = original


# --------------------------------------------------------------------------------------------
# What was quantized
# --------------------------------------------------------------------------------------------
def describe_quantization(graph: onnx.GraphProto, folder: Path | None = None) -> dict[str, Any]:
    """Quantized node counts by config, and every large float weight left unquantized."""
    inits = {t.name: t for t in graph.initializer}
    by_config: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            key = (
                f"{node.op_type} bits={attrs.get('bits', 4)} "
                f"block_size={attrs.get('block_size')} "
                f"accuracy_level={attrs.get('accuracy_level', 0)} "
                f"zero_points={'yes' if len(node.input) > 3 and node.input[3] else 'no'}"
            )
            by_config[key] = by_config.get(key, 0) + 1
    unquantized = []
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            continue  # their float inputs are the scales
        for name in node.input:
            t = inits.get(name)
            if t is None or t.data_type not in float_types or len(t.dims) < 2:
                continue
            if int(np.prod(t.dims)) < _MIN_WEIGHT_ELEMENTS:
                continue
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            unquantized.append(
                {
                    "node": node.name,
                    "op_type": f"{node.domain}.{node.op_type}".lstrip("."),
                    "weight": name,
                    "shape": list(t.dims),
                    "bytes": int(np.prod(t.dims)) * itemsize,
                    **({"transB": attrs["transB"]} if "transB" in attrs else {}),
                }
            )
    files = {}
    if folder is not None:
        files = {p.name: p.stat().st_size for p in Path(folder).glob(MODEL_FILE + "*")}
    return {
        "quantized": {"nodes": sum(by_config.values()), "by_config": by_config},
        "unquantized": unquantized,
        "files": files,
    }


def _graph_counts(graph: onnx.GraphProto) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return {"op_counts": dict(sorted(counts.items()))}


def _probe(src_model: Path, q_model: Path, tokens: int = 128) -> dict[str, float]:
    """Logit SQNR (dB) and top-1 agreement of the quantized model vs the source.

    On 2 windows of 128 calibration-split tokens (seed 1234, not the GPTQ windows' seed 0).
    """
    from transformers import AutoTokenizer

    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
    from modelfold.corpus import calibration_batches

    tokenizer = AutoTokenizer.from_pretrained(q_model.parent)
    ids = calibration_batches(tokenizer, n_samples=2, seq_len=tokens, seed=1234).numpy()
    ref, test = OnnxCausalLM(src_model), OnnxCausalLM(q_model)
    a, b = ref.logits(ids), test.logits(ids)  # [2, T, V]
    sqnr = 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum((a - b).astype(np.float64) ** 2))
    return {
        "logit_sqnr_db": float(sqnr),
        "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "max_abs_diff": float(np.abs(a - b).max()),
    }


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
        convert_attribute=False,
    )
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.chmod(0o644)  # onnx writes the data file 0600


@contextlib.contextmanager
def _quiet_ort_logging():
    """ORT's quantizer logs two INFO lines per node (and sets the root logger to INFO)."""
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor", "")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Evaluation: perplexity and decode speed, the modelfold protocols
# --------------------------------------------------------------------------------------------
def perplexity(
    artifact_dir: str | Path,
    *,
    chars: int = 200_000,
    window: int = 512,
    threads: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """`evaluate(OnnxCausalLM(dir), tokenizer, corpus_text("wikipedia", "eval"), ...)`."""
    from transformers import AutoTokenizer

    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
    from modelfold.corpus import corpus_text
    from modelfold.evaluate import evaluate

    tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
    lm = OnnxCausalLM(Path(artifact_dir), threads=threads)
    return evaluate(
        lm, tokenizer, corpus_text("wikipedia", "eval"), chars=chars, window=window, progress=progress
    )


def decode_speed(
    artifact_dirs: list[str | Path],
    *,
    threads: int = 2,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    runs: int = 5,
) -> dict[str, dict[str, float]]:
    """Batch-1 greedy decode tokens/s per artifact (tools/bench_spine.py protocol).

    Runs are interleaved across artifacts so machine noise hits all of them; medians reported.
    """
    from transformers import AutoTokenizer

    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
    from modelfold.corpus import corpus_text, tokenize_text

    tokenizer = AutoTokenizer.from_pretrained(artifact_dirs[0])
    text = corpus_text("wikipedia", "evaluation")
    prompt = [tokenizer.bos_token_id] + tokenize_text(tokenizer, text[:4000]).tolist()
    prompt = prompt[:prompt_tokens]
    lms = {str(d): OnnxCausalLM(Path(d), threads=threads) for d in artifact_dirs}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in lms}
    for lm in lms.values():
        lm.generate(prompt, 4)  # warm-up
    for _ in tqdm(range(runs), desc="decode runs", unit="round"):
        for key, lm in lms.items():
            results[key].append(lm.generate(prompt, new_tokens))
    return {
        key: {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
            "prefill_ms": 1000 * statistics.median(r["prefill_seconds"] for r in rs),
            "runs": runs,
            "prompt_tokens": len(prompt),
            "new_tokens": new_tokens,
        }
        for key, rs in results.items()
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="ORT-quantize an fp32 artifact into a new artifact")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--method", choices=METHODS, default="default")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--block-size", type=int, default=128)
    q.add_argument("--symmetric", action="store_true")
    q.add_argument("--accuracy-level", type=int, default=None)
    q.add_argument("--calib-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--percdamp", type=float, default=0.01)
    q.add_argument("--actorder", action="store_true")
    q.add_argument("--mse", action="store_true")
    q.add_argument("--gptq-driver", choices=GPTQ_DRIVERS, default="one-pass")
    q.add_argument(
        "--no-fix-zero-points",
        action="store_true",
        help="use ORT's own zero-point packer (fails when K/block is odd)",
    )
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true")
    a = sub.add_parser("accuracy-level", help="copy a MatMulNBits artifact with another level")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("level", type=int)
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("bench", help="perplexity and decode tokens/s of artifacts")
    b.add_argument("dirs", nargs="+")
    b.add_argument("--chars", type=int, default=200_000)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--no-perplexity", action="store_true")
    b.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "quantize":
        result = ort_quantize(
            args.src,
            args.out,
            method=args.method,
            bits=args.bits,
            block_size=args.block_size,
            symmetric=args.symmetric,
            accuracy_level=args.accuracy_level,
            calib_samples=args.calib_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            percdamp=args.percdamp,
            actorder=args.actorder,
            mse=args.mse,
            gptq_driver=args.gptq_driver,
            fix_zero_points=not args.no_fix_zero_points,
            overwrite=args.overwrite,
        )
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            print(
                f"wrote {result['out_dir']}/: {result['bytes']:,} bytes in "
                f"{result['seconds']:.1f}s; quantized {result['quantized']['by_config']}"
            )
            for u in result["unquantized"]:
                print(
                    f"  left fp32: {u['op_type']} {u['node']} {u['weight']} {u['shape']} "
                    f"({u['bytes']:,} bytes)"
                )
            print(f"  probe vs source: {result['probe']}")
        return 0
    if args.command == "accuracy-level":
        print(json.dumps(with_accuracy_level(args.src, args.out, args.level, overwrite=args.overwrite)))
        return 0
    from modelfold.artifact import read_manifest

    speed = decode_speed(args.dirs, threads=args.threads, runs=args.runs)
    rows = []
    for d in args.dirs:
        row = {"artifact": d, "bytes": read_manifest(d)["onnx_bytes"], **speed[str(d)]}
        if not args.no_perplexity:
            row.update(perplexity=perplexity(d, chars=args.chars, threads=args.threads)["perplexity"])
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| artifact | perplexity | bytes | decode (tokens/s) | prefill (ms) |")
        print("|---|---|---|---|---|")
        for r in rows:
            ppl = f"{r['perplexity']:.4f}" if "perplexity" in r else "-"
            print(
                f"| {r['artifact']} | {ppl} | {r['bytes']:,} | {r['decode_tokens_per_s']:.1f} "
                f"| {r['prefill_ms']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
