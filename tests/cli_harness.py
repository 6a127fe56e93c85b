"""Running the `maskscope` command in-process (a subprocess costs seconds of imports): the exit status, what
went to stderr, and whether an exception escaped as a traceback."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    """What one invocation of the command did."""

    code: int | None
    stdout: str
    stderr: str
    traceback: str | None

    def one_line_error(self) -> bool:
        """Exit 2, one line on stderr naming the error, no traceback."""
        lines = [x for x in self.stderr.splitlines() if x.strip()]
        return (
            self.traceback is None
            and self.code == 2
            and len(lines) == 1
            and lines[0].startswith("maskscope: error: ")
        )


def invoke(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Outcome:
    """Run `maskscope ARGS` in this process through the command's own entry point."""
    from maskscope.cli import main

    old_argv, old_cwd, old_env = sys.argv, os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    code: int | None = 0
    tb = None
    sys.argv = ["maskscope", *args]
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) or e.code is None else 1
            except BaseException:  # noqa: BLE001 - the point is to see anything that escapes
                tb = traceback.format_exc()
                code = None
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return Outcome(code, out.getvalue(), err.getvalue(), tb)


def tree(root: Path) -> set[str]:
    """Every file and directory under root, relative (SQLite's transient -wal/-shm files left out)."""
    return {
        str(p.relative_to(root))
        for p in Path(root).rglob("*")
        if not p.name.endswith(("-wal", "-shm", "-journal"))
    }
