"""Activations and additive interventions on the residual stream, through forward hooks in context managers.

Layer numbering, used everywhere in maskscope: layer 0 is the embedding output, layer i (1 <= i <= L) the
output of decoder layer i (transformers' `hidden_states[i]` for i < L; transformers returns the last layer after
the final norm, maskscope before it). Hooks are registered on entry and removed on exit: the model's weights and
modules are never changed, and outside the context every output is what it was (tested).

Steering adds `alpha * vector` to the output of the chosen layers, at every position ("all") or at the reply's
positions ("reply": from the prompt's last token on, so that the first reply token is predicted under steering).
Positions are absolute token positions given by the engine with each forward pass, so a KV-cached decoding step
is steered exactly as a full recomputation of the same sequence is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from maskscope.errors import UserError

POSITIONS = ("all", "reply")


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM, in order (Llama-style `base_model.layers`)."""
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__} (no base_model.layers)")
    return list(layers)


def check_layers(model: Any, layers: Sequence[int]) -> list[int]:
    """Layer indices as maskscope numbers them (0 = embeddings .. L), validated; one line when out of range."""
    n = len(decoder_layers(model))
    out = [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x <= n]
    if bad or not out:
        raise UserError(f"layers must be in 0..{n} (0 is the embedding output), not {bad or 'none'}")
    return out


def _module_for(model: Any, layer: int) -> torch.nn.Module:
    return model.get_input_embeddings() if layer == 0 else decoder_layers(model)[layer - 1]


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(
    model: Any, layers: Sequence[int], keep: Callable[[torch.Tensor], Any] | None = None
) -> Iterator[dict[int, list[Any]]]:
    """Record the residual stream at the given layers during every forward pass inside the context: yields
    {layer: [one record per forward pass]}, a record being the float32 tensor [B, T, H], or what `keep` makes
    of it (say, the positions wanted), taken inside the hook so that nothing else is copied."""
    seen: dict[int, list[Any]] = {layer: [] for layer in layers}
    handles = []
    for layer in layers:

        def hook(module: Any, args: Any, output: Any, layer: int = layer) -> None:
            hidden = _tensor(output).detach()
            if keep is None:
                seen[layer].append(hidden.float().clone())
            else:
                kept = keep(hidden)
                seen[layer].append([x.float().clone() for x in kept] if isinstance(kept, list) else kept)

        handles.append(_module_for(model, layer).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@dataclass
class Steering:
    """An additive intervention: `alpha * vectors[layer]` added to the output of each layer, at the
    positions chosen. `where` is set by the engine before each forward pass: (absolute positions [B, T], the
    first steered position of each row [B])."""

    vectors: dict[int, torch.Tensor]
    alpha: float
    positions: str = "reply"
    where: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def digest(self) -> dict[str, Any]:
        """What enters the cache key: a hash of each layer's vector, alpha and the positions."""
        parts = {}
        for layer, v in sorted(self.vectors.items()):
            data = v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
            parts[str(layer)] = hashlib.sha256(data).hexdigest()[:16]
        return {"vectors": parts, "alpha": self.alpha, "positions": self.positions}

    def add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The steered residual stream of one layer."""
        delta = (self.alpha * self.vectors[layer]).to(hidden.dtype).to(hidden.device)
        if self.positions == "all" or self.where is None:
            return hidden + delta
        positions, starts = self.where
        on = (positions >= starts[:, None]).to(hidden.dtype)[..., None]
        return hidden + on * delta


@contextmanager
def steering_hooks(model: Any, steering: Steering) -> Iterator[None]:
    """Register the forward hooks that apply `steering`; removed on exit."""
    handles = []
    for layer in steering.vectors:

        def hook(module: Any, args: Any, output: Any, layer: int = layer) -> Any:
            steered = steering.add(layer, _tensor(output))
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(_module_for(model, layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def as_vectors(vector: Any, layers: Sequence[int], hidden_size: int) -> dict[int, torch.Tensor]:
    """One vector per layer from a single vector [H] (used at every layer), a [len(layers), H] tensor or a
    {layer: vector} mapping; one line when shapes do not fit the model."""
    if isinstance(vector, dict):
        vectors = {int(k): torch.as_tensor(v, dtype=torch.float32) for k, v in vector.items()}
        if sorted(vectors) != sorted(layers):
            raise UserError(f"the steering vectors are for layers {sorted(vectors)}, not {sorted(layers)}")
    else:
        t = torch.as_tensor(vector, dtype=torch.float32)
        if t.dim() == 1:
            vectors = {layer: t for layer in layers}
        elif t.dim() == 2 and t.shape[0] == len(layers):
            vectors = {layer: t[i] for i, layer in enumerate(layers)}
        else:
            raise UserError(f"a steering vector must be [hidden] or [layers, hidden], not {list(t.shape)}")
    for layer, v in vectors.items():
        if v.shape != (hidden_size,):
            raise UserError(
                f"the steering vector of layer {layer} has shape {list(v.shape)}, not [{hidden_size}]"
            )
        if not torch.isfinite(v).all():
            raise UserError(f"the steering vector of layer {layer} is not finite")
    return vectors
