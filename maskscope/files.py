"""Reading the user's files: any problem becomes a UserError of one line that names the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from maskscope.errors import UserError, validation_message

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of a YAML file; `what` names the file's role in the error ("spec file", ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate data into a pydantic model; the first failing field in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(validation_message(e, source)) from None
