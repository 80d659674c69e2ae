"""``ExportOptions``: every option of an ONNX Runtime export, validated once.

The CLI, ``modelfold.export``, ``write_artifact`` and ``export_onnx`` pass one ``ExportOptions``
along instead of keyword arguments; its fields are checked when it is built (before any model is
loaded when the CLI builds it). This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelfold.errors import OptionError
from modelfold.options import Options, option

OPTIMIZATION_LEVEL_NAMES = ("disabled", "basic", "extended", "all")
LORA_MODES = ("merge", "separate", "inputs")
SPARSE_MODES = ("compressed", "dense")
# MatMulNBits' accuracy_level: 0 = unset (float32 compute for float32 inputs), 1 = fp32,
# 2 = fp16, 3 = bf16, 4 = int8 (activations quantized per block inside the kernel). DESIGN.md:
# a 4096 x 4096 int4 weight on 2 threads took 3.2 ms at level 0 and 1.3 ms at level 4 (batch 1).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)

# Offline optimization level of the artifact. Decode tokens/s of SmolLM2-135M (ORT 1.32, opset 23,
# 2 threads, 64-token prompt, 64 greedy tokens, median of 5 interleaved runs, session loaded with
# no further optimization): disabled 37.8, basic 43.8, extended 43.2, all 44.6 (torch eager 14.8);
# run-to-run noise on this shared machine is about +-3. basic/extended/all are equal within
# noise. "extended" is chosen: it is the highest level whose output is portable ("all" adds layout
# transforms for this machine's CPU, and ONNX Runtime documents that such a model must then run on
# the same hardware); the runtime may still apply "all" at load time.
DEFAULT_OPTIMIZATION_LEVEL = "extended"


@dataclass(frozen=True)
class ExportOptions(Options):
    """How a program is lowered to an ONNX Runtime artifact."""

    label = "export"

    accuracy_level: int = option(0, "MatMulNBits compute type of quantized linears: 0 float like "
                                    "torch, 4 int8 activations (faster on CPU), 1/2/3 fp32/fp16/bf16")
    lora: Literal["merge", "separate", "inputs"] = option(
        "merge", "LoRA adapters: merged into float weights (branches on quantized ones), "
                 "separate Gemm branches, or ONNX Runtime adapter inputs + adapter files")
    sparse: Literal["compressed", "dense"] = option(
        "compressed", "N:M sparse layers: kept values + packed indices (decompressed when ONNX "
                      "Runtime loads the model) or dense weights")
    disable: tuple[str, ...] = option((), "graph passes the lowering applies by default that "
                                          "should not run (e.g. tied-linear)")
    parity: bool = option(True, "check the artifact against the torch model")
    opset: int = option(23, "ONNX opset of the default domain (>= 18; 23 has Attention, "
                            "RMSNormalization and RotaryEmbedding)")
    optimize: bool = option(True, "apply ONNX Runtime's graph optimizations offline")
    optimization_level: Literal["disabled", "basic", "extended", "all"] = option(
        DEFAULT_OPTIMIZATION_LEVEL, "offline optimization level (extended: the highest portable)")
    keep_unoptimized: bool = option(False, "keep model.unoptimized.onnx next to the artifact")
    bounded_memory: bool = option(False, "keep the weights file as the exporter streamed it and "
                                         "never load it back (models larger than memory): no "
                                         "offline optimization (the session optimizes at load), "
                                         "no deduplication of equal initializers")
    external_data_threshold_bytes: int = option(1024, "initializers at least this large go to "
                                                      "model.onnx.data")
    verbose: bool = option(False, "print the exporter's own progress")
    provider: Literal["cpu", "cuda"] = option(
        "cpu", "execution provider the artifact is made for (its parity check runs there): cpu, "
               "or cuda (needs onnxruntime-gpu and an NVIDIA GPU; float16 weights)")
    dtype: Literal["float32", "float16"] = option(
        "float32", "float type of the artifact's weights and activations (cuda: float16, which "
                   "GroupQueryAttention on CUDA needs)")

    def validate(self) -> None:
        level = self.accuracy_level
        if isinstance(level, bool) or not isinstance(level, int) or level not in ACCURACY_LEVELS:
            raise OptionError(f"export option 'accuracy_level' must be one of "
                              f"{', '.join(map(str, ACCURACY_LEVELS))}; got {self.accuracy_level!r}")
        if self.opset < 18:
            raise OptionError(f"export option 'opset' must be >= 18 (torch.onnx's dynamo "
                              f"exporter); got {self.opset}")
        if self.external_data_threshold_bytes < 0:
            raise OptionError("export option 'external_data_threshold_bytes' must be >= 0; got "
                              f"{self.external_data_threshold_bytes}")
        if self.provider == "cuda" and self.dtype != "float16":
            raise OptionError("export option 'provider' cuda needs dtype float16 (ONNX Runtime's "
                              "GroupQueryAttention on CUDA takes float16 only); got "
                              f"{self.dtype}")
        for choices, name, value in ((("cpu", "cuda"), "provider", self.provider),
                                     (("float32", "float16"), "dtype", self.dtype),
                                     (LORA_MODES, "lora", self.lora),
                                     (SPARSE_MODES, "sparse", self.sparse),
                                     (OPTIMIZATION_LEVEL_NAMES, "optimization_level",
                                      self.optimization_level)):
            if value not in choices:
                raise OptionError(f"export option '{name}' must be one of "
                                  f"{', '.join(choices)}; got {value!r}")

    def check_graph_passes(self) -> None:
        """``disable`` names registered passes (called by the exporter, which loads them)."""
        from modelfold.passes.registry import get_pass

        for name in self.disable:
            get_pass(name)


def export_options(options: ExportOptions | None = None, **kwargs: object) -> ExportOptions:
    """``options``, or ``ExportOptions`` built from keyword arguments (not both)."""
    if options is not None and kwargs:
        raise OptionError(f"pass either options= or keyword options ({', '.join(kwargs)}), "
                          "not both")
    if options is not None:
        if not isinstance(options, ExportOptions):
            raise OptionError(f"options must be an ExportOptions; got {type(options).__name__}")
        return options
    return ExportOptions.from_options(kwargs)


__all__ = ["ACCURACY_LEVELS", "DEFAULT_OPTIMIZATION_LEVEL", "LORA_MODES",
           "OPTIMIZATION_LEVEL_NAMES", "SPARSE_MODES", "ExportOptions", "export_options"]
