"""`--set path.to.field=value`: a change to a spec made on the command line. The value is parsed as YAML
(`--set samples=40` is the number 40, `--set targets='[yes, sure]'` a list); the path is checked against the
experiment's pydantic Spec before anything is read, so that an unknown field is one line naming the fields
there are; the changed spec is then validated as a whole like any spec file."""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

from pydantic import BaseModel

from maskscope.errors import UserError
from maskscope.files import parse_yaml

Location = tuple[str | int, ...]


def parse_set(text: str) -> tuple[Location, Any]:
    """`path.to.field=value` as (location, YAML-parsed value); a list item is addressed by its index
    (`tasks.0.n=5`)."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise UserError(f"--set {text!r}: give path.to.field=value")
    parts = path.strip().split(".")
    if any(not p for p in parts):
        raise UserError(f"--set {text!r}: the path {path!r} has an empty part")
    location: Location = tuple(int(p) if p.isdigit() else p for p in parts)
    return location, parse_yaml(raw, f"--set {path}")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation allows (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        args = typing.get_args(annotation)[: 1 if origin is typing.Annotated else None]
        return [m for a in args for m in _models_in(a)]
    return []


def _list_items(annotation: Any) -> Any | None:
    """The item annotation of a list the annotation allows, else None."""
    origin = typing.get_origin(annotation)
    if origin is list:
        return (typing.get_args(annotation) or (Any,))[0]
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(annotation):
            item = _list_items(a)
            if item is not None:
                return item
    return None


def check_location(spec_class: type[BaseModel], location: Location) -> None:
    """Refuse (one line) a location that names no field of `spec_class` or of the models nested in it."""
    shown = ".".join(map(str, location))
    models: list[type[BaseModel]] = [spec_class]
    annotation: Any = spec_class
    for depth, part in enumerate(location):
        if isinstance(part, int):
            item = _list_items(annotation)
            if item is None:
                where = ".".join(map(str, location[:depth])) or "the spec"
                raise UserError(f"--set {shown}: {where} is not a list, so {part} does not index it")
            annotation, models = item, _models_in(item)
            continue
        fields = {name: f for m in models for name, f in m.model_fields.items()}
        if part not in fields:
            owner = ".".join(map(str, location[:depth])) or spec_class.__name__
            if not fields:
                raise UserError(f"--set {shown}: {owner} is a value, not a mapping with field {part!r}")
            known = ", ".join(sorted(fields))
            raise UserError(f"--set {shown}: {owner} has no field {part!r} (its fields: {known})")
        annotation = fields[part].annotation
        models = _models_in(annotation)


def apply_sets(data: Any, sets: list[tuple[Location, Any]], spec_class: type[BaseModel] | None) -> Any:
    """A copy of the spec mapping `data` with each (location, value) set, checked against `spec_class`
    when it is known (an unknown experiment is refused later, by the spec's own validation)."""
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    for location, value in sets:
        shown = ".".join(map(str, location))
        if spec_class is not None:
            check_location(spec_class, location)
        node: Any = data
        for depth, part in enumerate(location[:-1]):
            nxt = location[depth + 1]
            if isinstance(node, dict) and isinstance(part, str):
                if not isinstance(node.get(part), dict | list):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                raise UserError(f"--set {shown}: {_no_item(location[:depth], part, node)}")
        last = location[-1]
        if isinstance(node, dict) and isinstance(last, str):
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        else:
            raise UserError(f"--set {shown}: {_no_item(location[:-1], last, node)}")
    return data


def _no_item(where: Location, part: str | int, node: Any) -> str:
    """Why `part` cannot be set inside `node` (found at `where`)."""
    name = ".".join(map(str, where)) or "the spec"
    if isinstance(node, list):
        return f"{name} has {len(node)} items, so there is no item {part} (items are counted from 0)"
    return f"{name} is not a list in the spec, so {part} does not index it"
