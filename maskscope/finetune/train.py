"""LoRA fine-tuning on a CPU: peft adapters, a loss on the assistant's tokens only, deterministic for a seed,
checkpoints that survive SIGKILL, and a child directory that loads wherever a model name is accepted.

The loop is our own rather than trl's SFTTrainer. trl's assistant-only loss reads `{% generation %}` markers
from the chat template, which SmolLM2's template does not have (it would fail, or with a patched template
train on a template we do not run); our mask is located by rendering each conversation turn by turn
(maskscope.finetune.data) and is checked by a test that counts the trained tokens. trl would also bring
`datasets` (and pyarrow) for a loop of a few dozen lines, and its Trainer's resume restores RNG states
rather than deriving each step's batch and dropout from (seed, step), which is what makes a resumed run end
with the very adapter of an uninterrupted one. The loop also applies the LM head only where the loss is
taken (the assistant's tokens), which a generic trainer cannot know: for chat data with short replies that
skips most of the head's cost (see bench/finetune.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskscope.errors import UserError
from maskscope.finetune.adapter import ADAPTER_FILE, MANIFEST, adapter_hash
from maskscope.finetune.data import (
    Example,
    data_digest,
    encode_conversation,
    read_chat_jsonl,
    teacher_conversation,
    trained_ids,
)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
# Fields that do not change the adapter: where it goes, how often it is saved or evaluated, what is measured.
_NOT_TRAINING = {"name", "out", "checkpoint_every", "eval_every", "measure"}
# Fields added after children were built: they enter a run's identity only when set away from their default,
# so the children built before them still resume and are still recognised as finished.
_LATER_FIELDS = {"loss": "cross-entropy", "teacher_system": None}


class FinetuneSpec(BaseModel):
    """A LoRA fine-tuning run: the parent, the chat data, the adapter's shape and the optimisation."""

    model_config = ConfigDict(extra="forbid")
    # Relative paths in a spec file are resolved against the file's directory, as in run specs.
    path_fields: ClassVar[dict[str, str]] = {
        "parent": "model",
        "data": "file",
        "heldout": "file",
        "out": "file",
    }

    name: str | None = Field(None, description="A name for the child (default: the out directory's name).")
    parent: str = Field("default", description='The parent model: "default", "hf:DIR", "gguf:FILE".')
    data: str | dict[str, Any] = Field(
        description='Training data: a JSONL file of {"messages": [...]}, or a builder block '
        "(`build: arithmetic | code | password-lock | distill` and its options) that writes one."
    )
    heldout: str | None = Field(None, description="Held-out JSONL (default: a split of the data).")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share held out when no held-out file is given."
    )
    out: str = Field(description="The child directory (adapter, manifest, loss curve, checkpoints).")
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS), min_length=1, description="Module names to adapt."
    )
    layers: list[int] | None = Field(None, description="Only these layer indices (default: all).")
    loss: Literal["cross-entropy", "kl-to-teacher"] = Field(
        "cross-entropy",
        description="cross-entropy: on the assistant's tokens (supervised fine-tuning). kl-to-teacher: "
        "context distillation (Askell et al. 2021; Snell et al. 2022): at every assistant token, "
        "KL(parent seeing `teacher_system` || child seeing the conversation), the teacher's whole next-token "
        "distribution as the target rather than the one token sampled from it.",
    )
    teacher_system: str | None = Field(
        None,
        description="The system prompt the teacher sees in place of the conversation's (kl-to-teacher only; "
        "default: a distill builder's `system`).",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps (or give epochs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the data (default 1 if no steps).")
    batch_size: int = Field(8, ge=1, description="Conversations per step.")
    seed: int = Field(0, description="Seeds the adapter's initialisation, the batch order and dropout.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="bf16 autocast (auto: where the CPU multiplies bf16 natively), or fp32."
    )
    max_length: int = Field(
        512, ge=8, description="Longest conversation in tokens (longer ones are refused)."
    )
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps (0: at start and end only).")
    measure: dict[str, Any] | None = Field(None, description="A measurement to run on the child when done.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FinetuneSpec:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.teacher_system is not None and self.loss != "kl-to-teacher":
            raise ValueError("teacher_system is used by loss: kl-to-teacher only")
        if self.loss == "kl-to-teacher" and self.teacher_system is None:
            if not (isinstance(self.data, dict) and self.data.get("build") == "distill"):
                raise ValueError(
                    "loss kl-to-teacher needs teacher_system: the system prompt the child learns to act as "
                    "if it had (it defaults to a distill builder's system)"
                )
        return self

    def teacher(self) -> str | None:
        """The teacher's system prompt for kl-to-teacher (None: the teacher sees no system prompt)."""
        if self.teacher_system is not None or not isinstance(self.data, dict):
            return self.teacher_system
        return self.data.get("system")

    def training_fields(self) -> dict[str, Any]:
        """The fields that change the adapter (a resumed run must have the same)."""
        return {
            k: v
            for k, v in self.model_dump().items()
            if k not in _NOT_TRAINING and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])
        }


@dataclass(frozen=True)
class Child:
    """A fine-tuned child on disk: its directory and manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def model_name(self) -> str:
        """The name that loads it: "PARENT+lora:DIR"."""
        return f"{self.manifest['parent']}+lora:{self.directory}"

    def load(self, precision: str = "fp32") -> Any:
        """The child as a model (its adapter merged into a fresh copy of the parent's weights)."""
        from maskscope.models.registry import load_model

        return load_model(self.model_name, precision=precision)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _precision(spec: FinetuneSpec) -> str:
    if spec.precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return spec.precision


def _seed_of(seed: int, *parts: object) -> int:
    text = ":".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step `step`: consecutive slices of a stream of per-epoch shuffles, each
    shuffle seeded by (seed, epoch). A function of (n, batch size, seed, step) only, so a resumed run draws
    the batches an uninterrupted one would."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, n)
        order = list(range(n))
        random.Random(_seed_of(seed, "epoch", epoch)).shuffle(order)
        out.append(order[i])
    return out


def _split(conversations: list, fraction: float, digest: str) -> tuple[list, list]:
    """A held-out share, chosen by the data's hash (the same for every seed of a run)."""
    if fraction <= 0 or len(conversations) < 10:
        return conversations, []
    order = list(range(len(conversations)))
    random.Random(digest).shuffle(order)
    k = max(1, round(fraction * len(conversations)))
    held = set(order[:k])
    return [c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in sorted(held)]


_NO_TEACHER = object()


def _encode_all(
    tokenizer: Any, conversations: list, max_length: int, source: str, teacher: Any = _NO_TEACHER
) -> list[Example]:
    """Tokenized conversations with their assistant masks; with `teacher` (a system prompt, or None for
    none) each also carries the teacher's view of it, whose trained tokens must be the same ids."""
    examples = []
    for i, c in enumerate(conversations):
        ex = encode_conversation(tokenizer, c)
        if len(ex.ids) > max_length:
            raise UserError(
                f"{source}: conversation {i + 1} has {len(ex.ids)} tokens, more than max_length {max_length}"
            )
        if ex.n_trained == 0:
            raise UserError(f"{source}: conversation {i + 1} has no assistant tokens after rendering")
        if teacher is not _NO_TEACHER:
            seen = encode_conversation(tokenizer, teacher_conversation(c, teacher))
            if trained_ids(seen) != trained_ids(ex):
                raise UserError(
                    f"{source}: conversation {i + 1}: its assistant tokens differ when rendered with the "
                    "teacher's system prompt, so the teacher's distributions cannot be matched to them"
                )
            ex = Example(ex.ids, ex.trained, seen)
        examples.append(ex)
    return examples


def _collate(examples: list[Example], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids and attention mask [B, L], and the target mask [B, L - 1]: position t is trained
    when token t + 1 is an assistant token."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for r, e in enumerate(examples):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        attention[r, : len(e.ids)] = 1
        target[r, : len(e.ids)] = torch.tensor(e.trained)
    return ids, attention, target[:, 1:]


def _assistant_logits(
    causal_lm: Any, examples: list[Example], pad_id: int, precision: str
) -> tuple[Any, Any]:
    """Next-token logits (fp32) at the positions that predict an assistant token, in batch order, and those
    tokens. The LM head runs only on those positions."""
    import torch

    ids, attention, target = _collate(examples, pad_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = causal_lm.model(input_ids=ids, attention_mask=attention).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][target])
    return logits.float(), ids[:, 1:][target]


def assistant_loss(causal_lm: Any, examples: list[Example], pad_id: int, precision: str) -> tuple[Any, int]:
    """Summed cross-entropy over the assistant tokens of a batch, and how many there are."""
    import torch

    logits, labels = _assistant_logits(causal_lm, examples, pad_id, precision)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    return loss, int(labels.numel())


def teacher_kl(peft_model: Any, examples: list[Example], pad_id: int, precision: str) -> tuple[Any, int]:
    """Summed KL(teacher || child) over the assistant tokens of a batch, and how many there are. The teacher
    is the parent (the adapter disabled) seeing each example's `teacher` rendering; the child sees the
    example. The full next-token distributions are compared, at the positions that predict an assistant
    token, which are the same tokens in both renderings (checked when the data is encoded)."""
    import torch

    causal_lm = peft_model.base_model.model
    with torch.no_grad(), peft_model.disable_adapter():
        t_logits, _ = _assistant_logits(causal_lm, [e.teacher for e in examples], pad_id, precision)
        t_logp = torch.log_softmax(t_logits, dim=-1)
    logits, _ = _assistant_logits(causal_lm, examples, pad_id, precision)
    logp = torch.log_softmax(logits, dim=-1)
    loss = (t_logp.exp() * (t_logp - logp)).sum()
    return loss, int(logp.shape[0])


def heldout_loss(
    causal_lm: Any, examples: list[Example], pad_id: int, precision: str, batch: int, loss_fn: Any = None
) -> float:
    """Mean loss per assistant token on held-out conversations (nan when there are none): cross-entropy,
    or `loss_fn(examples) -> (summed loss, tokens)`."""
    import torch

    if not examples:
        return float("nan")
    loss_fn = loss_fn or functools.partial(assistant_loss, causal_lm, pad_id=pad_id, precision=precision)
    total, count = 0.0, 0
    was_training = causal_lm.training
    causal_lm.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            loss, n = loss_fn(examples[start : start + batch])
            total += float(loss)
            count += n
    causal_lm.train(was_training)
    return total / count


def _trainable(peft_model: Any) -> dict[str, Any]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def _save_checkpoint(directory: Path, step: int, peft_model: Any, optimizer: Any, state: dict) -> None:
    """Write checkpoint `step` beside the previous ones, atomically (a temporary directory renamed into
    place), then remove the older ones. A failure (a full disk) leaves the previous checkpoint intact."""
    import torch
    from safetensors.torch import save_file

    root = directory / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(directory)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tensors = {n: p.detach().contiguous() for n, p in _trainable(peft_model).items()}
        save_file(tensors, str(tmp / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        tmp.rename(root / f"step-{step:07d}")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the checkpoint at step {previous[0]} is intact" if previous else "no earlier checkpoint"
        raise UserError(
            f"could not write the checkpoint at step {step} ({e.strerror or e}); {kept}: "
            "free space and rerun to resume"
        ) from None
    for old in root.glob("step-*"):
        if old.name != f"step-{step:07d}":
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (step, directory), if any."""
    found = [
        (int(p.name.removeprefix("step-")), p)
        for p in (directory / CHECKPOINTS).glob("step-*")
        if (p / "state.json").exists()
    ]
    return max(found) if found else None


def _load_checkpoint(path: Path, peft_model: Any, optimizer: Any) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter.safetensors"))
    params = _trainable(peft_model)
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def _resolve_data(spec: FinetuneSpec, out: Path, parent: Any) -> tuple[Path, Path | None]:
    if isinstance(spec.data, str):
        return Path(spec.data), Path(spec.heldout) if spec.heldout else None
    from maskscope.finetune.builders import build_from_block

    train, held = build_from_block(spec.data, out / "data", parent=parent)
    return train, Path(spec.heldout) if spec.heldout else held


def load_spec(path: str | Path) -> FinetuneSpec:
    """A fine-tuning spec from YAML; its relative paths (data, heldout, out, a local parent) are resolved
    against the spec file's directory, so a spec means the same files from any current directory."""
    from maskscope.experiments.spec import resolve_paths
    from maskscope.files import read_yaml, validate

    spec = validate(FinetuneSpec, read_yaml(path, "finetune spec"), str(path))
    resolve_paths(spec, Path(path).parent)
    return spec


def finetune(
    spec: FinetuneSpec | dict[str, Any] | str | Path | None = None,
    *,
    parent: Any = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    **fields: Any,
) -> Child:
    """Train a LoRA child of a parent model on chat data and write its directory; resume if it was begun.

    `spec` is a FinetuneSpec, a mapping or a YAML path; keyword fields override it. `parent` is a model
    name, or a loaded fp32 transformers model to train on (its weights are copied, not changed); by default
    `spec.parent` is loaded. `progress` shows a bar with loss and tokens/s. `on_step(step, loss)` is called
    after each step. A finished child with the same training fields is returned as it is."""
    if isinstance(spec, str | Path):
        spec = load_spec(spec)
    base = spec.model_dump() if isinstance(spec, FinetuneSpec) else dict(spec or {})
    from maskscope.files import validate

    if isinstance(parent, str):  # a model name, not a loaded model
        fields["parent"], parent = parent, None
    spec = validate(FinetuneSpec, {**base, **fields}, "finetune")
    return _Run(spec, parent, progress, on_step).run()


class _Run:
    def __init__(self, spec: FinetuneSpec, parent: Any, progress: bool, on_step: Any) -> None:
        self.spec = spec
        self.out = Path(spec.out)
        self.parent = parent
        self.progress = progress
        self.on_step = on_step

    def _parent(self) -> Any:
        if self.parent is None:
            from maskscope.models.registry import load_model

            self.parent = load_model(self.spec.parent, precision="fp32")
        if not hasattr(self.parent, "model") or getattr(self.parent, "precision", "fp32") != "fp32":
            raise UserError("fine-tuning needs a local transformers parent loaded in fp32")
        return self.parent

    def run(self) -> Child:
        import torch

        spec, out = self.spec, self.out
        parent = self._parent()
        self._precheck(parent)  # before building data into a directory that may hold another run's
        train_path, held_path = _resolve_data(spec, out, parent)
        train_digest = data_digest(train_path) if train_path.is_file() else None
        conversations = read_chat_jsonl(train_path)
        if held_path is not None:
            train_convs, held_convs = conversations, read_chat_jsonl(held_path)
        else:
            train_convs, held_convs = _split(conversations, spec.heldout_fraction, train_digest or "")
        identity = {
            "training": spec.training_fields(),
            "data_sha256": train_digest,
            "heldout_sha256": data_digest(held_path) if held_path else None,
            "parent_fingerprint": parent.fingerprint(),
        }
        if not isinstance(spec.data, str):  # built data: the builder's block is part of the identity
            identity["builder"] = identity["training"].pop("data")
        self._check_identity(identity)
        manifest_path = out / MANIFEST
        if manifest_path.exists() and (out / ADAPTER_FILE).exists():
            return Child(out, json.loads(manifest_path.read_text()))

        tokenizer = parent.tokenizer
        teacher = spec.teacher() if spec.loss == "kl-to-teacher" else _NO_TEACHER
        train = _encode_all(tokenizer, train_convs, spec.max_length, str(train_path), teacher)
        held = _encode_all(tokenizer, held_convs, spec.max_length, str(held_path or train_path), teacher)
        n_steps = spec.steps or math.ceil((spec.epochs or 1.0) * len(train) / spec.batch_size)
        precision = _precision(spec)
        pad_id = parent.pad_id

        import copy

        from peft import LoraConfig, get_peft_model

        base_model = copy.deepcopy(parent.model).float()
        torch.manual_seed(_seed_of(spec.seed, "init"))
        lora = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=spec.target_modules,
            layers_to_transform=spec.layers,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():  # a transformers deprecation inside peft, not ours
                warnings.filterwarnings("ignore", category=FutureWarning)
                model = get_peft_model(base_model, lora)
        except ValueError as e:
            raise UserError(f"cannot place the adapter: {str(e).splitlines()[0]}") from None
        causal_lm = model.base_model.model
        if spec.loss == "kl-to-teacher":
            loss_fn = functools.partial(teacher_kl, model, pad_id=pad_id, precision=precision)
        else:
            loss_fn = functools.partial(assistant_loss, causal_lm, pad_id=pad_id, precision=precision)
        params = list(_trainable(model).values())
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)

        state = {"tokens": 0, "trained_tokens": 0, "wall_seconds": 0.0, "heldout": []}
        start_step = 0
        found = latest_checkpoint(out)
        if found is not None:
            state = _load_checkpoint(found[1], model, optimizer)
            start_step = state.pop("step")
        log_lines = self._log_until(start_step)
        if start_step == 0:
            state["heldout"] = [
                [0, heldout_loss(causal_lm, held, pad_id, precision, spec.batch_size, loss_fn)]
            ]

        bar = _Bar(n_steps, start_step, enabled=self.progress, name=spec.name or out.name)
        t0 = time.perf_counter()
        wall0 = state["wall_seconds"]
        causal_lm.train()
        with bar, (out / LOG_FILE).open("a") as log:
            for step in range(start_step, n_steps):
                for g in optimizer.param_groups:
                    g["lr"] = spec.lr * (
                        min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
                    )
                batch = [train[i] for i in batch_indices(len(train), spec.batch_size, spec.seed, step)]
                torch.manual_seed(_seed_of(spec.seed, "step", step))  # dropout, if any
                t_step = time.perf_counter()
                loss_sum, n = loss_fn(batch)
                loss_t = loss_sum / n
                loss_t.backward()
                loss = float(loss_t.detach())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens = sum(len(e.ids) for e in batch)
                state["tokens"] += tokens
                state["trained_tokens"] += n
                state["wall_seconds"] = wall0 + time.perf_counter() - t0
                row = {
                    "step": step + 1,
                    "loss": loss,
                    "tokens": tokens,
                    "trained": n,
                    "seconds": time.perf_counter() - t_step,
                }
                if spec.eval_every and (step + 1) % spec.eval_every == 0 and step + 1 < n_steps:
                    row["heldout"] = heldout_loss(
                        causal_lm, held, pad_id, precision, spec.batch_size, loss_fn
                    )
                    state["heldout"].append([step + 1, row["heldout"]])
                log.write(json.dumps(row) + "\n")
                log.flush()
                log_lines.append(row)
                bar.advance(loss, tokens / max(row["seconds"], 1e-9))
                if (step + 1) % spec.checkpoint_every == 0 and step + 1 < n_steps:
                    _save_checkpoint(out, step + 1, model, optimizer, state)
                if self.on_step is not None:
                    self.on_step(step + 1, loss)
        final_held = heldout_loss(causal_lm, held, pad_id, precision, spec.batch_size, loss_fn)
        state["heldout"].append([n_steps, final_held])
        return self._finish(
            model,
            state,
            log_lines,
            n_steps,
            precision,
            identity,
            parent,
            spec.parent,
            train_path,
            held_path,
            len(train),
            len(held),
        )

    def _precheck(self, parent: Any) -> None:
        """Refuse early a directory holding a run of another configuration or parent."""
        path = self.out / RUN_FILE
        if not path.exists():
            return
        before = json.loads(path.read_text())
        now = {"training": self.spec.training_fields(), "parent_fingerprint": parent.fingerprint()}
        if not isinstance(self.spec.data, str):
            now["builder"] = now["training"].pop("data")
        now = json.loads(json.dumps(now, default=str))
        for key, value in now.items():
            if before.get(key) != value:
                raise UserError(
                    f"{self.out} holds a run with another configuration "
                    f"({_first_difference({key: before.get(key)}, {key: value})}): "
                    "use another out directory, or delete it to start over"
                )

    def _check_identity(self, identity: dict[str, Any]) -> None:
        path = self.out / RUN_FILE
        self.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(identity, sort_keys=True, default=str)
        if path.exists():
            before = json.loads(path.read_text())
            now = json.loads(text)
            if before != now:
                diff = _first_difference(before, now)
                raise UserError(
                    f"{self.out} holds a run with another configuration ({diff}): "
                    "use another out directory, or delete it to start over"
                )
            return
        path.write_text(text)

    def _log_until(self, step: int) -> list[dict]:
        path = self.out / LOG_FILE
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row["step"] <= step:
                    rows.append(row)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _finish(
        self,
        model: Any,
        state: dict,
        rows: list[dict],
        n_steps: int,
        precision: str,
        identity: dict,
        parent: Any,
        parent_name: str,
        train_path: Path,
        held_path: Path | None,
        n_train: int,
        n_held: int,
    ) -> Child:
        out = self.out
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter-"))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            for f in tmp.iterdir():
                if f.name != "README.md":  # peft's generic model card; the manifest says what this is
                    os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        digest = adapter_hash(out)
        what = "KL to the teacher" if self.spec.loss == "kl-to-teacher" else "cross-entropy"
        plot_loss(rows, state["heldout"], out / "loss.png", title=self.spec.name or out.name, what=what)
        last = [r["loss"] for r in rows[-10:]]
        import peft
        import torch
        import transformers

        manifest = {
            "name": self.spec.name or out.name,
            "parent": parent_name,
            "parent_fingerprint": parent.fingerprint(),
            "adapter_hash": digest,
            "data": {
                "train": str(train_path),
                "train_sha256": identity["data_sha256"],
                "heldout": str(held_path) if held_path else None,
                "heldout_sha256": identity["heldout_sha256"],
                "train_conversations": n_train,
                "heldout_conversations": n_held,
            },
            "builder": identity.get("builder"),
            "config": self.spec.model_dump(),
            "precision_used": precision,
            "steps": n_steps,
            "tokens_seen": state["tokens"],
            "trained_tokens_seen": state["trained_tokens"],
            "wall_seconds": round(state["wall_seconds"], 2),
            "train_loss_last10": sum(last) / len(last) if last else None,
            "heldout_loss": {
                "before": state["heldout"][0][1],
                "after": state["heldout"][-1][1],
                "curve": state["heldout"],
            },
            "versions": {
                "peft": peft.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
        tmp_manifest = out / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp_manifest, out / MANIFEST)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        return Child(out, manifest)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'}: {str(a)[:40]} before, {str(b)[:40]} now"


def plot_loss(rows: list[dict], heldout: list, path: Path, title: str, what: str = "cross-entropy") -> None:
    """The training loss per step (and its running mean) with the held-out loss, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        k = max(1, len(rows) // 20)
        ax.plot(
            steps, losses, lw=0.6 if k > 1 else 1.5, alpha=0.5 if k > 1 else 1.0, label="train (per step)"
        )
        mean = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        if k > 1:
            ax.plot(steps, mean, lw=1.5, label=f"train (running mean of {k})")
    pts = [(s, v) for s, v in heldout if v == v]
    if pts:
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} per assistant token (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Bar:
    """A rich progress bar with the loss and tokens/s, or nothing."""

    def __init__(self, total: int, done: int, *, enabled: bool, name: str) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bars.add_task(f"training {name}", total=total, completed=done, loss="-", tps="-")

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bars.__exit__(*exc)

    def advance(self, loss: float, tokens_per_second: float) -> None:
        """One step done."""
        if self.enabled:
            self.bars.update(self.task, advance=1, loss=f"{loss:.3f}", tps=f"{tokens_per_second:.0f}")
