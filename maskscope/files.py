"""Reading the user's files and writing outputs: any problem becomes a UserError of one line that names the file.

Reading: text must be UTF-8; YAML mappings must not repeat a key (the last one would silently win).
Writing: every output is written to a temporary file in its directory and renamed over the target, so that a
kill mid-write leaves the old file or the new one, never half of one; a full disk, a read-only file system or
a missing permission becomes one line saying what could not be written, where, and that a rerun resumes."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from maskscope.errors import UserError, validation_message

M = TypeVar("M", bound=BaseModel)

# Write errors that a user can fix (free space, permissions, a writable place) rather than program errors.
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "the name is too long",
}
RESUME = "free the space or fix the permissions, then rerun the same command to resume"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping with a repeated key."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: SafeLoader refuses it with a proper mark below
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a user's file; `what` names the file's role in the error ("spec file", ...)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{what} not found: {path}")
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot read {what} {path!r}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8"
        ) from None


def parse_yaml(text: str, source: str) -> Any:
    """Parsed YAML text (safe, no repeated keys); `source` names where it came from in the error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"{source}:{where} not valid YAML: {problem}") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of a YAML file; `what` names the file's role in the error ("spec file", ...)."""
    return parse_yaml(read_text(path, what), str(path))


def _non_finite(data: Any, where: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], float] | None:
    """The first infinite or NaN number in nested data (YAML's .inf and .nan), with its location."""
    if isinstance(data, float) and not math.isfinite(data):
        return where, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        found = _non_finite(v, (*where, k))
        if found is not None:
            return found
    return None


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate data into a pydantic model, strictly (`true` is not 1, "3" is not 3, no infinite or NaN
    numbers); the first failing field in one line."""
    bad = _non_finite(data)
    if bad is not None:
        where = ".".join(map(str, bad[0])) or "(top level)"
        raise UserError(f"{source}: field '{where}': must be a finite number, not {bad[1]}")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        raise UserError(validation_message(e, source)) from None


def write_error(e: OSError, what: str, where: str | Path) -> UserError | None:
    """The one-line UserError for a write that failed for a reason the user can fix, else None."""
    reason = WRITE_ERRNOS.get(e.errno or -1)
    if reason is None:
        return None
    return UserError(f"cannot write {what} to {where}: {reason}; {RESUME}")


@contextlib.contextmanager
def writing(what: str, where: str | Path) -> Iterator[None]:
    """Turn a write that fails for a reason the user can fix (ENOSPC, EROFS, EACCES...) into one line."""
    try:
        yield
    except OSError as e:
        error = write_error(e, what, where)
        if error is None:
            raise
        raise error from None


def atomic_write(path: str | Path, write: Callable[[Path], Any], what: str | None = None) -> Path:
    """Write a file through `write(temporary path)` in the same directory, then rename it over `path`."""
    path = Path(path)
    with writing(what or path.name, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name[-80:]}")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str, what: str | None = None) -> Path:
    """Write UTF-8 text to a file atomically (a temporary file renamed over it)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)
