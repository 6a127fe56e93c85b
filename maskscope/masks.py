"""Masks as first-class objects: a mask is a name plus a conditioning (a system prompt, a preamble, or a
few-shot dialogue); a library is a set of masks with prior weights, loaded from YAML."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskscope.errors import UserError
from maskscope.files import read_yaml, validate
from maskscope.models.base import Conversation, Message


class Turn(BaseModel):
    """One message of a few-shot dialogue or a transcript."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str


class Mask(BaseModel):
    """A character the model can be made to simulate, and the conditioning that puts it on."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short label.")
    system: str | None = Field(
        None, description="System prompt. None (and nothing else): the model's default."
    )
    preamble: str | None = Field(
        None, description="Text put before the first user turn (models without system)."
    )
    few_shot: list[Turn] = Field(
        default_factory=list, description="Example turns shown before the real ones."
    )
    prior: float = Field(1.0, gt=0, description="Prior weight (normalised over the library).")
    description: str = Field("", description="What the mask is, for reports.")

    @model_validator(mode="after")
    def _alternating_few_shot(self) -> Mask:
        roles = [t.role for t in self.few_shot]
        if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
            raise ValueError(f"mask {self.name!r}: few_shot turns must alternate user/assistant")
        if roles and roles[0] != "user":
            raise ValueError(f"mask {self.name!r}: few_shot must start with a user turn")
        return self

    def conversation(self, turns: Sequence[Turn | Message] = (), prefill: str = "") -> Conversation:
        """This mask's conditioning followed by the given turns (and an optional assistant prefill)."""
        messages: list[Message] = []
        if self.system is not None:
            messages.append(Message("system", self.system))
        messages += [Message(t.role, t.content) for t in self.few_shot]
        messages += [Message(t.role, t.content) for t in turns]
        if self.preamble:
            first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
            if first is None:
                messages.append(Message("user", self.preamble))
            else:
                messages[first] = Message("user", f"{self.preamble}\n\n{messages[first].content}")
        return Conversation(tuple(messages), prefill)


class MaskLibrary(BaseModel):
    """A set of masks with prior weights."""

    model_config = ConfigDict(extra="forbid")
    masks: list[Mask] = Field(min_length=1, description="The masks.")

    @model_validator(mode="after")
    def _unique(self) -> MaskLibrary:
        names = [m.name for m in self.masks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"mask names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def names(self) -> list[str]:
        """The masks' names, in library order."""
        return [m.name for m in self.masks]

    def log_priors(self) -> list[float]:
        """Normalised log prior weights, in library order."""
        total = sum(m.prior for m in self.masks)
        return [math.log(m.prior / total) for m in self.masks]

    def get(self, name: str) -> Mask:
        """The mask with this name."""
        for m in self.masks:
            if m.name == name:
                return m
        raise UserError(f"no mask named {name!r} in the library (masks: {', '.join(self.names)})")

    def without(self, name: str) -> MaskLibrary:
        """The library less one mask."""
        self.get(name)
        return MaskLibrary(masks=[m for m in self.masks if m.name != name])

    @classmethod
    def load(cls, path: str | Path) -> MaskLibrary:
        """Read a library from a YAML file with a top-level `masks:` list."""
        return validate(cls, read_yaml(path, "mask library"), str(path))
