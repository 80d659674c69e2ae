"""modelfold: capture a model, rewrite it with verified passes, lower it to a runtime artifact.

    import modelfold
    result = modelfold.transform("smollm2-135m", passes="layer-importance,drop-layers{count=4}")
    modelfold.export(result, "out/", backend="onnxruntime")
    modelfold.save(result, "ckpt/")   # reload later with modelfold.load("ckpt/")

Heavy dependencies (torch, transformers, onnx) are imported on first use, so ``import modelfold``
is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from modelfold.ir.program import Program
    from modelfold.passes.manager import PassContext


class TransformResult:
    """What ``transform`` returns: the module, its ``Program`` (FX graph) and the per-pass report.

    Attributes:
        module: the transformed ``nn.Module`` (runs in eager PyTorch).
        program: the ``Program``; ``program.exported`` is the captured graph.
        pipeline: the canonical pipeline string that reproduces this run.
        report: the report as a dict (``report_markdown()`` for people).
    """

    def __init__(self, program: Program, pipeline: str):
        self.program = program
        self.pipeline = pipeline

    @property
    def module(self) -> nn.Module:
        return self.program.module

    @property
    def report(self) -> dict[str, Any]:
        from modelfold.passes.report import report_dict

        return report_dict(self.program, pipeline=self.pipeline)

    def report_markdown(self) -> str:
        from modelfold.passes.report import to_markdown

        return to_markdown(self.report)

    def write_report(self, out_dir: str | Path) -> dict[str, Any]:
        from pathlib import Path

        from modelfold.passes.report import write_report

        return write_report(self.program, Path(out_dir), pipeline=self.pipeline)


def load(model: str | None = None) -> Program:
    """Load a model as a Program: an asset name, a local HF directory or a checkpoint folder
    written by ``save`` (default: the embedded SmolLM2)."""
    from modelfold.assets import load_model, resolve_model
    from modelfold.checkpoint import is_checkpoint, load_checkpoint
    from modelfold.ir.program import Program

    path = resolve_model(model)
    if is_checkpoint(path):  # keeps the saved pass log
        return load_checkpoint(path)
    module, tokenizer = load_model(path)
    return Program(module, tokenizer=tokenizer, source=str(path))


def transform(model: Any, passes: str | list[Any] | Path, *, tokenizer: Any = None,
              context: PassContext | None = None) -> TransformResult:
    """Run a pipeline of passes over ``model``.

    Args:
        model: an ``nn.Module`` (Hugging Face model), a ``Program``, the ``TransformResult`` of
            an earlier ``transform`` (continued in place), or an asset name / model directory.
        passes: a pipeline string (``"layer-importance,drop-layers{count=4}"``), a YAML recipe
            path, or a list of passes / strings / ``{name: {options}}`` mappings.
        tokenizer: used for calibration text when ``model`` is a module.
        context: cross-cutting switches (verification, measurement, disabled passes).

    Returns:
        A ``TransformResult`` with the transformed module, the Program and the report.
    """
    from modelfold.ir.program import Program
    from modelfold.passes.manager import PassManager
    from modelfold.passes.pipeline import build_pipeline, pipeline_string

    if isinstance(model, Program):
        program = model
    elif isinstance(model, TransformResult):  # a pipeline continued: its Program and log
        program = model.program
    elif isinstance(model, str) or model is None:
        program = load(model)
    else:
        program = Program(model, tokenizer=tokenizer)
    pipeline = build_pipeline(passes)
    PassManager(pipeline, context).run(program)
    return TransformResult(program, pipeline_string(pipeline))


def stream(model: str | Path, passes: str | list[Any] | Path, out_dir: str | Path, *,
           overwrite: bool = False, resume: bool = True, activation_budget: int | str = "2GB",
           measure: bool = True) -> dict[str, Any]:
    """Transform a checkpoint folder one decoder layer at a time into the checkpoint ``out_dir``
    (models larger than memory); an interrupted run resumes after its last finished layer.
    Returns the checkpoint's manifest. See ``modelfold.streaming.stream_transform``."""
    from modelfold.streaming import stream_transform

    return stream_transform(model, passes, out_dir, overwrite=overwrite, resume=resume,
                            activation_budget=activation_budget, measure=measure)


def export(result: TransformResult | Program | nn.Module, out_dir: str | Path, *,
           backend: str = "onnxruntime", overwrite: bool = False, options: Any = None,
           progress: bool | Any = False, **option_values: Any) -> dict[str, Any]:
    """Lower a (transformed) model to a self-contained artifact folder; returns its manifest.

    The Program's verified graph is what is lowered (no second capture). The folder is written
    under a temporary name and moved into place only when complete, so an interrupted export
    leaves no partial output. ``options`` is a
    ``modelfold.backends.onnxruntime.options.ExportOptions`` (or give its fields as keyword
    arguments): ``accuracy_level`` (the ``MatMulNBits`` compute type of quantized linears: 0
    float, as torch; 4 int8 activations, faster on CPU), ``lora`` ("merge": folded into float
    weights, kept as branches on quantized ones; "separate"; "inputs": one base artifact and an
    ONNX Runtime adapter file per adapter under ``adapters/``), ``sparse`` ("compressed": kept
    values / codes + packed indices, decompressed when ONNX Runtime loads the model; "dense"),
    ``parity``, ``disable`` (graph passes of the lowering to skip) and the optimizer settings.
    ``progress=True`` prints the export's phases with their elapsed time to stderr (or pass a
    callable taking one line).
    """
    from modelfold.artifact import write_artifact
    from modelfold.ir.program import Program

    if isinstance(result, TransformResult):
        program, pipeline = result.program, result.pipeline
    elif isinstance(result, Program):
        program, pipeline = result, ""
    else:
        program, pipeline = Program(result), ""
    if progress is True:
        import sys

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    return write_artifact(program, out_dir, backend=backend, pipeline=pipeline,
                          overwrite=overwrite, options=options, progress=progress or None,
                          **option_values)


def compile(result: TransformResult | Program | nn.Module, *, backend: str = "triton",
            **options: Any) -> Any:
    """Compile a (transformed) model for a GPU: Triton kernels for the dialect ops (quantized,
    N:M sparse, LoRA layers; LoRA fused into its base), ``torch.compile`` (Inductor) for the rest.

    Returns a ``CompiledModel`` (call it like the model, or ``.logits(ids)``,
    ``.generate(prompt_ids, n)``; ``.kernels`` lists the kernel of every lowered layer).
    Options: ``device``, ``dtype`` (default float16), ``interpret`` (run the kernels in Triton's
    CPU interpreter: the only way without a CUDA GPU, which otherwise raises
    ``TritonBackendError``), ``inductor`` (default True). See
    ``modelfold.backends.triton.compile``.
    """
    if backend != "triton":
        raise ValueError(f"compile supports backend='triton'; got {backend!r} (for ONNX Runtime "
                         "use modelfold.export(result, out_dir, backend='onnxruntime'))")
    from modelfold.backends.triton.compile import compile_model

    return compile_model(result, **options)


def save(result: TransformResult | Program | nn.Module, out_dir: str | Path, *,
         overwrite: bool = False, format: str = "auto") -> dict[str, Any]:
    """Save a (transformed) model as a checkpoint folder that ``load`` rebuilds without re-running
    its passes (no re-calibration); returns the checkpoint's manifest.

    The folder holds ``config.json``, ``model.safetensors`` (each tied tensor once),
    ``modelfold_checkpoint.json`` (pipeline, pass log, replaced modules, tied-tensor aliases) and
    the tokenizer; it is written under a temporary name and moved into place when complete.
    A dense-to-MoE conversion (``moefy{weights=softmax}``) is written as a standard Mixtral /
    Qwen2-MoE checkpoint that plain ``transformers`` loads (``format="auto"``, the default;
    ``"modelfold"`` forces modelfold's format, ``"transformers"`` fails when no standard format
    fits). See ``modelfold.checkpoint``.
    """
    from modelfold.checkpoint import save_checkpoint

    return save_checkpoint(result, out_dir, overwrite=overwrite, format=format)


def save_adapter(result: TransformResult | Program | nn.Module, out_dir: str | Path, *,
                 name: str = "default", overwrite: bool = False) -> dict[str, Any]:
    """Write adapter ``name`` in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``); see ``modelfold.adapters``."""
    from modelfold.adapters import save_adapter as _save

    return _save(result, out_dir, name=name, overwrite=overwrite)


def load_adapter(model: TransformResult | Program | nn.Module, path: str | Path, *,
                 name: str = "default", trainable: bool = False) -> dict[str, Any]:
    """Apply a PEFT (or modelfold) LoRA adapter folder to ``model``; see ``modelfold.adapters``."""
    from modelfold.adapters import load_adapter as _load

    return _load(model, path, name=name, trainable=trainable)


def train(model: TransformResult | Program | nn.Module, **options: Any) -> dict[str, Any]:
    """Fine-tune the trainable parameters of ``model`` (those a pass such as ``lora`` marked);
    see ``modelfold.finetune.train`` for the options (steps, lr, teacher, checkpoint_dir, ...)."""
    from modelfold.finetune import train as _train

    return _train(model, **options)


def uptrain(model: TransformResult | Program | nn.Module, *, teacher: nn.Module,
            **options: Any) -> dict[str, Any]:
    """Distil the original model (``teacher``) into a ``tie-layers`` model (the shared weights and
    the relaxation adapters) or a ``share-attention`` one (the sharing layers' attention); see
    ``modelfold.recursive.uptrain``."""
    from modelfold.recursive import uptrain as _uptrain

    return _uptrain(model, teacher=teacher, **options)


def save_recursive(result: TransformResult | Program | nn.Module, out_dir: str | Path, *,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write a ``tie-layers`` model as ``base/`` (checkpoint, shared weights once) and
    ``adapter/`` (PEFT LoRA of the per-depth relaxation); see ``modelfold.recursive``."""
    from modelfold.recursive import save_recursive as _save

    return _save(result, out_dir, overwrite=overwrite)


def sparse_train(model: TransformResult | Program | nn.Module, **options: Any) -> dict[str, Any]:
    """Sparsity-aware training of an N:M sparse model (``nm-sparsify`` first), ending exactly N:M;
    see ``modelfold.sparse_training.sparse_train`` (teacher, sparse_options, training options)."""
    from modelfold.sparse_training import sparse_train as _sparse_train

    return _sparse_train(model, **options)


__all__ = ["TransformResult", "compile", "export", "load", "load_adapter", "save", "save_adapter",
           "sparse_train", "train", "transform"]
