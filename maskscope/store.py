"""The store: a SQLite, content-addressed cache of every model call, and the record of runs.

A call's key is the SHA-256 of its parts (the model's fingerprint, the rendered prompt, the method, its
arguments, the seed and the sample index), written as canonical JSON. Each result is committed as soon as it
exists, so a run killed at any point resumes with nothing computed twice. Errors are never stored.

Under faults: the file is in WAL mode with a busy timeout, and every statement is retried while another process
holds the lock, so several runs can share one store; lookups are buffered and written with the next result,
never holding the write lock between results. Each result carries a checksum over its key, parts and bytes: a
row that fails it or does not parse is treated as missing (recomputed, and counted in `damaged`), never served.
A damaged file, a full disk or a read-only store is one line (UserError) that says what to do. The schema has a
version (`PRAGMA user_version`); stores of the first schema are migrated in place when opened."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from maskscope.errors import UserError
from maskscope.models.base import (
    Context,
    ContinueJob,
    ForcedJob,
    LanguageModel,
    ModelAPI,
    Sample,
    SampleParams,
    Scored,
    TokenDist,
)

SCHEMA_VERSION = 1  # 0: the first schema (no version, no checksums); 1: checksums and this version

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    parts TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    writes INTEGER NOT NULL DEFAULT 1,
    checksum TEXT
);
CREATE INDEX IF NOT EXISTS calls_method ON calls(method);
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lookups (
    run TEXT NOT NULL,
    key TEXT NOT NULL,
    method TEXT NOT NULL,
    hit INTEGER NOT NULL,
    PRIMARY KEY (run, key)
);
"""

# How long a statement waits for another process's lock (SQLite's busy timeout), then how long it keeps retrying.
BUSY_TIMEOUT = 30.0
RETRY_FOR = 120.0
LOOKUP_BATCH = 500  # buffered lookups written in one short transaction

T = TypeVar("T")


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal parts always give the same key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def call_key(parts: Mapping[str, Any]) -> str:
    """The content address of a call."""
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


def row_checksum(key: str, parts: str, result: str) -> str:
    """The checksum of a stored result: SHA-256 over its key, its parts and its bytes as stored."""
    h = hashlib.sha256()
    for field in (key, parts, result):
        h.update(field.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _busy(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _store_error(e: sqlite3.Error, path: Path) -> UserError | None:
    """The one-line UserError for an SQLite error a user can do something about, else None."""
    shown = " ".join(str(e).split())[:200]
    text = shown.lower()
    if "full" in text:
        return UserError(
            f"cannot write the store {path}: the disk is full; free space, then rerun the same command to resume"
        )
    if "readonly" in text or "read-only" in text:
        return UserError(
            f"cannot write the store {path}: it is read-only; make it writable or give another --store, "
            "then rerun the same command to resume"
        )
    if "unable to open" in text or "disk i/o" in text:
        what = "it is a directory" if path.is_dir() else "cannot open or write it"
        return UserError(f"cannot use the store {path}: {what}; give a writable file path (--store)")
    if (
        "not a database" in text
        or "no such column" in text  # a schema whose text was damaged
        or "no such table" in text
        or "malformed" in text
        or "corrupt" in text
        or type(e) is sqlite3.DatabaseError
    ):
        return UserError(
            f"the store {path} is damaged ({shown}); `maskscope cache repair --store {path}` salvages the readable "
            "results (then rerun to recompute the rest)"
        )
    return None


def _text(data: bytes) -> str:
    """SQLite text as str; bytes that are not UTF-8 (a damaged page) become lone surrogates, so that the row
    fails its checksum instead of failing the query."""
    return data.decode("utf-8", "surrogateescape")


def _open(path: Path | str, *, read_only: bool = False) -> sqlite3.Connection:
    uri = f"file:{Path(path).absolute().as_posix()}?mode=ro" if read_only else str(path)
    db = sqlite3.connect(uri, uri=read_only, timeout=BUSY_TIMEOUT, isolation_level=None)
    db.text_factory = _text
    return db


def _usable_row(key: str, parts: str, result: str, checksum: str | None) -> Any | None:
    """A stored row's result if its checksum holds and it parses, else None."""
    if not all(isinstance(x, str) for x in (key, parts, result, checksum)):  # a damaged record's types
        return None
    if checksum != row_checksum(key, parts, result):
        return None
    try:
        return _Parsed(json.loads(result))
    except (ValueError, TypeError):
        return None


@dataclass
class _Parsed:
    value: Any


@dataclass
class Explanation:
    """A stored call's parts, and the nearest call stored before it, with the fields that differ."""

    key: str
    stored: bool
    parts: dict[str, Any] | None
    nearest_key: str | None = None
    differences: dict[str, tuple[Any, Any]] | None = None


@dataclass
class CheckReport:
    """What `Store.check` found: the file's own check, and stored results that fail their checksum."""

    path: Path
    file_ok: bool
    file_problem: str | None
    results: int
    damaged: list[str]
    schema_version: int

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return self.file_ok and not self.damaged


class Store:
    """A SQLite file of model-call results and run records. Safe to reopen after a crash, and to share between
    processes. `damaged` counts the stored results that failed their checksum or did not parse (each was
    treated as missing, so recomputed)."""

    def __init__(self, path: str | Path, *, check: bool = False) -> None:
        """Open (or create) a store; `check` also runs SQLite's quick check of the whole file and a test write,
        so that a damaged or read-only store is refused before any work starts."""
        self.path = Path(path)
        self.run: str | None = None
        self.damaged = 0
        self._damaged_keys: set[str] = set()
        self._lookups: list[tuple[str, str, str, int]] = []
        if self.path.is_dir():
            raise UserError(
                f"cannot use the store {self.path}: it is a directory; give a file path (--store)"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from maskscope.files import write_error

            raise (write_error(e, "the store", self.path) or e) from None
        self.db = self._guard(self._connect)
        try:
            self._guard(self._prepare, check)
        except BaseException:
            self.db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        db = _open(self.path)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        return db

    def _prepare(self, check: bool) -> None:
        def read(sql: str) -> list[Any]:
            return self._with_retries(lambda: self.db.execute(sql).fetchall())

        read("SELECT COUNT(*) FROM sqlite_master")  # "file is not a database" is raised here
        if str(read("PRAGMA journal_mode")[0][0]).lower() != "wal":
            read("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if check:
            problem = self._quick_check()
            if problem is not None:
                raise sqlite3.DatabaseError(f"database disk image is malformed: {problem}")
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise UserError(
                f"the store {self.path} was written by a newer maskscope (schema {version}, this one reads "
                f"{SCHEMA_VERSION}): upgrade, or give another --store"
            )
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version < SCHEMA_VERSION or not {"calls", "runs", "lookups"} <= tables or check:
            self._write(self._create_or_migrate)  # a write: a read-only store is refused here

    def _create_or_migrate(self) -> None:
        """Create the schema, or bring a store of the first schema up to this one in place: missing columns
        added, and a checksum computed for every row whose key still matches its parts and whose result
        parses (any other row keeps no checksum, so it counts as damaged and is recomputed)."""
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        for statement in [x for x in SCHEMA.split(";") if x.strip()]:
            self.db.execute(statement)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
        if "writes" not in columns:
            self.db.execute("ALTER TABLE calls ADD COLUMN writes INTEGER NOT NULL DEFAULT 1")
        if "checksum" not in columns:
            self.db.execute("ALTER TABLE calls ADD COLUMN checksum TEXT")
        run_columns = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
        for column in ("hits", "misses"):
            if column not in run_columns:
                self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        if version < 1:
            rows = self.db.execute("SELECT key, parts, result FROM calls WHERE checksum IS NULL").fetchall()
            for key, parts, result in rows:
                try:
                    json.loads(result)
                    ok = call_key(json.loads(parts)) == key
                except (ValueError, TypeError):
                    ok = False
                if ok:
                    self.db.execute(
                        "UPDATE calls SET checksum = ? WHERE key = ?", (row_checksum(key, parts, result), key)
                    )
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _quick_check(self) -> str | None:
        rows = [r[0] for r in self.db.execute("PRAGMA quick_check(3)")]
        return None if rows == ["ok"] else "; ".join(map(str, rows))[:200]

    # ------------------------------------------------------------------ faults
    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) with SQLite errors a user can act on turned into one line."""
        try:
            return fn(*args)
        except sqlite3.Error as e:
            error = _store_error(e, self.path)
            if error is None:
                raise
            raise error from None
        except UnicodeDecodeError:  # SQLite's own message quoted bytes of a damaged schema
            raise _store_error(sqlite3.DatabaseError("damaged schema"), self.path) from None
        except OSError as e:
            from maskscope.files import write_error

            error = write_error(e, "the store", self.path)
            if error is None:
                raise
            raise error from None

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read statement, retried while another process holds a lock; all rows."""
        return self._guard(self._with_retries, lambda: self.db.execute(sql, params).fetchall())

    def _write(self, fn: Callable[[], T]) -> T:
        """fn() inside one write transaction (BEGIN IMMEDIATE ... COMMIT), retried as a whole while another
        process holds the lock; the lock is held only for fn's statements."""

        def transaction() -> T:
            try:
                if self.db.in_transaction:  # left open by an interruption between two statements
                    self.db.execute("ROLLBACK")
                self.db.execute("BEGIN IMMEDIATE")
                value = fn()
                self.db.execute("COMMIT")
                return value
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

        return self._guard(self._with_retries, transaction)

    def _with_retries(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + RETRY_FOR
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _busy(e) or time.monotonic() > deadline:
                    if _busy(e):
                        raise UserError(
                            f"the store {self.path} stayed locked by another process for "
                            f"{BUSY_TIMEOUT + RETRY_FOR:.0f} s; rerun the same command to resume"
                        ) from None
                    raise
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    def close(self) -> None:
        """Write any buffered lookups and close the database."""
        try:
            if self._lookups:
                self._flush_lookups()
        finally:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def _fetch(self, key: str) -> Any | None:
        rows = self._execute("SELECT parts, result, checksum FROM calls WHERE key = ?", (key,))
        if not rows:
            return None
        parsed = _usable_row(key, *rows[0])
        if parsed is None:
            if key not in self._damaged_keys:
                self._damaged_keys.add(key)
                self.damaged += 1
            return None
        return parsed

    def get(self, key: str, method: str = "") -> Any | None:
        """The stored result of a call, or None (also for a damaged row: it is recomputed, and counted in
        `damaged`); the lookup is recorded against the current run, without taking the write lock."""
        found = self._fetch(key)
        if self.run is not None:
            self._lookups.append((self.run, key, method, int(found is not None)))
            if len(self._lookups) >= LOOKUP_BATCH:
                self._flush_lookups()
        return None if found is None else found.value

    def result(self, key: str) -> Any | None:
        """The stored result of a call, or None; unlike `get`, not recorded as a lookup of the current run."""
        found = self._fetch(key)
        return None if found is None else found.value

    def _flush_lookups(self) -> None:
        batch, self._lookups = self._lookups, []

        def write() -> None:
            self.db.executemany(
                "INSERT OR REPLACE INTO lookups(run, key, method, hit) VALUES (?, ?, ?, ?)", batch
            )

        self._write(write)

    def put(self, key: str, parts: Mapping[str, Any], result: Any) -> None:
        """Store a result and commit at once. A key already stored with a sound result is kept as it is (the
        first writer wins, so two processes computing one call store it once); a damaged row is replaced and
        its `writes` counted up."""
        parts_text, result_text = canonical(parts), canonical(result)
        checksum = row_checksum(key, parts_text, result_text)
        batch, self._lookups = self._lookups, []

        def write() -> None:
            row = self.db.execute(
                "SELECT parts, result, checksum FROM calls WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and _usable_row(key, *row) is not None:
                pass
            elif row is None:
                self.db.execute(
                    "INSERT INTO calls(key, method, parts, result, created, checksum) VALUES (?, ?, ?, ?, ?, ?)",
                    (key, parts["method"], parts_text, result_text, time.time(), checksum),
                )
            else:
                self.db.execute(
                    "UPDATE calls SET parts = ?, result = ?, checksum = ?, writes = writes + 1 WHERE key = ?",
                    (parts_text, result_text, checksum, key),
                )
            if batch:
                self.db.executemany(
                    "INSERT OR REPLACE INTO lookups(run, key, method, hit) VALUES (?, ?, ?, ?)", batch
                )

        try:
            self._write(write)
        except BaseException:
            self._lookups = batch + self._lookups
            raise
        self._damaged_keys.discard(key)

    def count(self, method: str | None = None) -> int:
        """How many calls are stored (of one method, if given)."""
        if method is None:
            return int(self._execute("SELECT COUNT(*) FROM calls")[0][0])
        return int(self._execute("SELECT COUNT(*) FROM calls WHERE method = ?", (method,))[0][0])

    def writes(self) -> dict[str, int]:
        """Key -> how many times its result was written (1 for every call computed once)."""
        return {k: int(w) for k, w in self._execute("SELECT key, writes FROM calls")}

    def parts(self, key: str) -> dict[str, Any] | None:
        """The parts a stored key was made from."""
        rows = self._execute("SELECT parts FROM calls WHERE key = ?", (key,))
        return None if not rows else json.loads(rows[0][0])

    def find_keys(self, prefix: str) -> list[str]:
        """Stored or looked-up keys that start with a prefix (taken literally: % and _ are not wildcards)."""
        rows = self._execute(
            "SELECT key FROM calls WHERE substr(key, 1, ?) = ? "
            "UNION SELECT key FROM lookups WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix, len(prefix), prefix),
        )
        return sorted(r[0] for r in rows)

    def explain(self, key: str) -> Explanation:
        """Why a call had to be computed: its parts, and the call of the same method stored before it
        whose parts differ least, with the fields that differ. A key that was looked up but never
        computed (an interrupted run) has no parts."""
        rows = self._execute("SELECT parts, created FROM calls WHERE key = ?", (key,))
        if not rows:
            return Explanation(key, False, None)
        parts, created = json.loads(rows[0][0]), rows[0][1]
        mine = _flatten(parts)
        best: tuple[int, str, dict[str, tuple[Any, Any]]] | None = None
        for other_key, other_parts in self._execute(
            "SELECT key, parts FROM calls WHERE method = ? AND created < ? AND key != ?",
            (parts["method"], created, key),
        ):
            theirs = _flatten(json.loads(other_parts))
            fields = sorted(set(mine) | set(theirs))
            diff = {f: (mine.get(f), theirs.get(f)) for f in fields if mine.get(f) != theirs.get(f)}
            if best is None or len(diff) < best[0]:
                best = (len(diff), other_key, diff)
        if best is None:
            return Explanation(key, True, parts)
        return Explanation(key, True, parts, best[1], best[2])

    def lookups(self, run: str) -> list[tuple[str, str, bool]]:
        """(key, method, served from the store) for every call of a run."""
        if self._lookups:
            self._flush_lookups()
        rows = self._execute("SELECT key, method, hit FROM lookups WHERE run = ? ORDER BY rowid", (run,))
        return [(k, m, bool(h)) for k, m, h in rows]

    # ------------------------------------------------------------------ runs
    def start_run(self, name: str, spec: Mapping[str, Any]) -> None:
        """Record that a run started (or restarted); lookups from now on are recorded against it."""
        if self._lookups:
            self._flush_lookups()
        self.run = name

        def write() -> None:
            self.db.execute("DELETE FROM lookups WHERE run = ?", (name,))
            self.db.execute(
                "INSERT INTO runs(name, spec, status, started) VALUES (?, ?, 'running', ?) "
                "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, status = 'running', "
                "started = excluded.started, finished = NULL",
                (name, canonical(spec), time.time()),
            )

        self._write(write)

    def finish_run(self, name: str, status: str = "done") -> None:
        """Record how a run ended, with its cache hit and miss counts."""
        if self._lookups:
            self._flush_lookups()

        def write() -> None:
            hits, total = self.db.execute(
                "SELECT COALESCE(SUM(hit), 0), COUNT(*) FROM lookups WHERE run = ?", (name,)
            ).fetchone()
            self.db.execute(
                "UPDATE runs SET status = ?, finished = ?, hits = ?, misses = ? WHERE name = ?",
                (status, time.time(), hits, total - hits, name),
            )

        self._write(write)

    def run_record(self, name: str) -> dict[str, Any] | None:
        """A run's record: spec, status, start and end times, cache hits and misses."""
        rows = self._execute(
            "SELECT spec, status, started, finished, hits, misses FROM runs WHERE name = ?", (name,)
        )
        if not rows:
            return None
        spec, status, started, finished, hits, misses = rows[0]
        return {
            "spec": json.loads(spec),
            "status": status,
            "started": started,
            "finished": finished,
            "hits": hits,
            "misses": misses,
        }

    # ------------------------------------------------------------------ check and repair
    def check(self) -> CheckReport:
        """SQLite's integrity check of the file, and every stored result checked against its checksum."""
        problem = self._guard(self._with_retries, self._integrity)
        damaged = [
            key
            for key, parts, result, checksum in self._execute(
                "SELECT key, parts, result, checksum FROM calls"
            )
            if _usable_row(key, parts, result, checksum) is None
        ]
        results = int(self._execute("SELECT COUNT(*) FROM calls")[0][0])
        version = int(self._execute("PRAGMA user_version")[0][0])
        return CheckReport(self.path, problem is None, problem, results, damaged, version)

    def _integrity(self) -> str | None:
        rows = [r[0] for r in self.db.execute("PRAGMA integrity_check(5)")]
        return None if rows == ["ok"] else "; ".join(map(str, rows))[:300]


@dataclass
class RepairReport:
    """What `repair_store` did: results read and kept, those dropped, and where the damaged file went."""

    kept: int
    dropped: int
    runs: int
    moved_to: Path | None


def check_store(path: str | Path) -> CheckReport:
    """Check a store file without changing it: a file SQLite cannot read at all is a report, not an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"store not found: {path}")
    try:
        db = _open(path, read_only=True)
        try:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check(5)")]
            problem = None if rows == ["ok"] else "; ".join(map(str, rows))[:300]
            results, damaged = 0, []
            try:
                for key, parts, result, checksum in db.execute(
                    "SELECT key, parts, result, checksum FROM calls"
                ):
                    results += 1
                    if _usable_row(key, parts, result, checksum) is None:
                        damaged.append(key)
            except sqlite3.OperationalError as e:
                if "no such column: checksum" not in str(e):
                    raise
                results = int(db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
        if isinstance(e, sqlite3.Error) and _busy(e):
            raise UserError(
                f"the store {path} is locked by another process; try again when it is done"
            ) from None
        return CheckReport(path, False, str(e), 0, [], -1)
    return CheckReport(path, problem is None, problem, results, damaged, version)


def _salvage(db: sqlite3.Connection, table: str, columns: str) -> tuple[list[tuple[Any, ...]], bool]:
    """The rows of a table that can still be read, by rowid ranges around damaged pages; and whether all
    could be read."""
    try:
        return db.execute(f"SELECT {columns} FROM {table}").fetchall(), True
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        pass
    try:
        top = int(db.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0] or 0)
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        top = 1_000_000
    rows: list[tuple[Any, ...]] = []
    step = 256
    for low in range(0, top + 1, step):
        try:
            rows += db.execute(
                f"SELECT {columns} FROM {table} WHERE rowid >= ? AND rowid < ?", (low, low + step)
            ).fetchall()
        except (sqlite3.DatabaseError, UnicodeDecodeError):
            for rowid in range(low, low + step):
                try:
                    rows += db.execute(f"SELECT {columns} FROM {table} WHERE rowid = ?", (rowid,)).fetchall()
                except (sqlite3.DatabaseError, UnicodeDecodeError):
                    continue
    return rows, False


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def repair_store(path: str | Path) -> RepairReport:
    """Salvage a store: every result that can still be read and passes its checksum goes into a new file,
    which replaces the old one; the old file is kept beside it (``*.damaged-TIME``). Rows of the first
    schema (no checksum) are kept when their key matches their parts and their result parses."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"store not found: {path}")
    calls: list[tuple[Any, ...]] = []
    run_rows: list[tuple[Any, ...]] = []
    total = 0
    try:
        db = _open(path, read_only=True)
        try:
            try:
                columns = {r[1] for r in db.execute("PRAGMA table_info(calls)")}
            except (sqlite3.DatabaseError, UnicodeDecodeError):
                columns = set()
            if columns:
                checksum = "checksum" if "checksum" in columns else "NULL"
                writes = "writes" if "writes" in columns else "1"
                calls, _ = _salvage(db, "calls", f"key, method, parts, result, created, {writes}, {checksum}")
                total = len(calls)
                try:
                    run_rows, _ = _salvage(db, "runs", "name, spec, status, started, finished, hits, misses")
                except (sqlite3.DatabaseError, UnicodeDecodeError):
                    run_rows = []
        finally:
            db.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        calls = []
    kept = []
    for key, method, parts, result, created, writes, checksum in calls:
        try:
            if not all(isinstance(x, str) and _utf8(x) for x in (key, method, parts, result)):
                continue
            decoded = json.loads(parts)
            if (
                not isinstance(decoded, dict) or decoded.get("method") != method
            ):  # method is outside the checksum
                continue
            created = created if isinstance(created, int | float) else time.time()
            writes = writes if isinstance(writes, int) else 1
            if checksum is None:
                if call_key(json.loads(parts)) != key:
                    continue
                checksum = row_checksum(key, parts, result)
            if _usable_row(key, parts, result, checksum) is None:
                continue
        except (ValueError, TypeError):
            continue
        kept.append((key, method, parts, result, created, writes, checksum))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = path.with_name(f".{path.name}.repair-{os.getpid()}")
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    from maskscope.files import writing

    with writing("the repaired store", path.parent):
        new = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            new.execute("BEGIN")
            for statement in [x for x in SCHEMA.split(";") if x.strip()]:
                new.execute(statement)
            new.executemany("INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)", kept)
            good_runs = [r for r in run_rows if all(isinstance(x, str) and _utf8(x) for x in r[:3])]
            new.executemany("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", good_runs)
            new.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            new.execute("COMMIT")
        finally:
            new.close()
        moved = path.with_name(f"{path.name}.damaged-{stamp}")
        os.replace(path, moved)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                shutil.move(str(side), f"{moved}{suffix}")
        os.replace(tmp, path)
    return RepairReport(len(kept), total - len(kept), len(run_rows), moved)


ACTIVATION_CHUNK = 256  # items computed (and batched) together before they are stored


def tensor_blob(tensor: Any) -> dict[str, Any]:
    """A stored activation: the tensor as float16 safetensors bytes, base64 in the JSON result (so that the
    row's checksum, `cache check` and `cache repair` cover it like any result). A tensor with a finite value
    beyond float16's range is kept as float32 instead of turning it into infinity."""
    import base64

    import torch
    from safetensors.torch import save

    x = tensor.detach().to(torch.float32).cpu().contiguous()
    half = x.to(torch.float16)
    kept = half if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(x).all()) else x
    return {"safetensors": base64.b64encode(save({"activations": kept})).decode("ascii")}


def blob_tensor(result: Mapping[str, Any]) -> Any:
    """The float32 tensor of a stored activation (tensor_blob's inverse, up to its float16 rounding)."""
    import base64

    import torch
    from safetensors.torch import load

    return load(base64.b64decode(result["safetensors"]))["activations"].to(torch.float32)


class CachedModel(ModelAPI):
    """A model whose every call goes through the store: answered from it when the key is there, else
    computed, written at once, and returned. Offers the same API as the model it wraps.

    The calls that produce results are request types with keys (`CACHED`); the calls that only describe
    the model or its text side are forwarded (`FORWARDED`). Anything else is an AttributeError, never a
    silent uncached call."""

    CACHED = (
        "activations",
        "score_many",
        "next_token_distributions",
        "sample_indices",
        "token_logprobs",
        "support_logprobs",
        "token_ranks",
        "forced_answers",
        "continuations",
        "rewards",
    )
    FORWARDED = frozenset(
        {
            "tokenizer",
            "encode_prompt",
            "tokens",
            "decode",
            "sequence",
            "candidate",
            "token_texts",
            "end_tokens",
            "missing_capabilities",
            "request_stats",
            "position_logprobs",  # [T x V] per item, too large to store: what is computed from it is (`derived`)
            "num_layers",
        }
    )

    def __init__(self, model: LanguageModel, store: Store) -> None:
        self.inner = model
        self.store = store
        self.name = model.name
        self.capabilities = model.capabilities
        self.hits = 0
        self.misses = 0

    def fingerprint(self) -> dict[str, Any]:
        """The wrapped model's fingerprint (with the steering active at the time of the call)."""
        return self.inner.fingerprint()

    def render(self, context: Context) -> str:
        """The wrapped model's rendering."""
        return self.inner.render(context)

    @contextmanager
    def steer(self, *args: Any, **kwargs: Any) -> Iterator[CachedModel]:
        """The wrapped model's steering, for every call inside the context; yields this CachedModel, so that
        steered calls go through the store too (the steering is part of every key while it is active)."""
        with self.inner.steer(*args, **kwargs):
            yield self

    def __getattr__(self, name: str) -> Any:
        if name in CachedModel.FORWARDED:
            return getattr(self.inner, name)
        raise AttributeError(
            f"CachedModel does not forward {name!r}: only the cached calls ({', '.join(self.CACHED)}) and "
            f"the model's text side ({', '.join(sorted(self.FORWARDED))}) go through it"
        )

    def parts(
        self, method: str, prompt: str, args: Mapping[str, Any], fingerprint: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The key parts of one call."""
        model = dict(fingerprint if fingerprint is not None else self.fingerprint())
        return {"model": model, "method": method, "prompt": prompt, "args": dict(args)}

    def _through_store(
        self,
        method: str,
        keyed: Sequence[tuple[str, Mapping[str, Any]]],
        compute: Callable[[list[int]], Iterator[tuple[int, Any]]],
    ) -> Iterator[tuple[int, Any]]:
        """The one caching mechanism: item k has key parts (method, prompt, args). Stored items are yielded
        from the store; items with equal keys are computed once; `compute(missing item indices)` yields
        (position in that list, JSON result) for the rest, each stored as soon as it arrives and yielded
        for every item with its key. Exceptions propagate and store nothing."""
        missing: list[tuple[int, str, dict[str, Any]]] = []
        twins: dict[str, list[int]] = {}
        stored: dict[str, Any] = {}
        fingerprint = self.fingerprint()
        for k, (prompt, args) in enumerate(keyed):
            parts = self.parts(method, prompt, args, fingerprint)
            key = call_key(parts)
            if key in twins:
                twins[key].append(k)
                continue
            twins[key] = [k]
            found = self.store.get(key, method)
            if found is None:
                self.misses += 1
                missing.append((k, key, parts))
            else:
                self.hits += 1
                stored[key] = found
        for key, result in stored.items():
            for k in twins[key]:
                yield k, result
        if missing:
            for m, result in compute([k for k, _, _ in missing]):
                k, key, parts = missing[m]
                self.store.put(key, parts, result)
                for twin in twins[key]:
                    yield twin, result

    def score_many(
        self, requests: Sequence[tuple[Context, Sequence[str]]]
    ) -> Iterator[tuple[int, int, Scored]]:
        """Scores from the store where present; the rest computed in one batched call, each stored at once."""
        prompts = [self.render(context) for context, _ in requests]
        flat = [(r, j) for r, (_, conts) in enumerate(requests) for j in range(len(conts))]
        keyed = [(prompts[r], {"continuation": requests[r][1][j]}) for r, j in flat]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            groups: dict[int, list[int]] = {}
            for m, k in enumerate(todo):
                groups.setdefault(flat[k][0], []).append(m)
            rows = list(groups)
            regrouped = [
                (requests[r][0], [requests[r][1][flat[todo[m]][1]] for m in groups[r]]) for r in rows
            ]
            for g, j, scored in self.inner.score_many(regrouped):
                yield groups[rows[g]][j], scored.to_json()

        for k, result in self._through_store("score", keyed, compute):
            yield *flat[k], Scored.from_json(result)

    def next_token_distributions(
        self, contexts: Sequence[Context], top_k: int
    ) -> Iterator[tuple[int, TokenDist]]:
        """Top-k distributions from the store where present; the rest computed and stored."""
        keyed = [(self.render(c), {"top_k": top_k}) for c in contexts]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            for m, dist in self.inner.next_token_distributions([contexts[k] for k in todo], top_k):
                yield m, dist.to_json()

        for k, result in self._through_store("next_token_distribution", keyed, compute):
            yield k, TokenDist.from_json(result)

    def activations(self, items: Sequence[Any], layers: Sequence[int], positions: str = "last") -> list[Any]:
        """Activations through the store, one stored result per item (key: the fingerprint with adapter and
        steering, the rendered prompt, the reply's token ids, the layers and the positions), each a float16
        safetensors blob. Computed ones are rounded the same way before they are returned, so a result is
        bit-identical whether it was served or computed: float32 tensors holding float16-rounded values."""
        items, layers = list(items), [int(x) for x in layers]
        keyed = []
        for item in items:
            context, reply = item if isinstance(item, tuple) else (item, ())
            args = {"layers": layers, "positions": positions, "reply": [int(t) for t in reply]}
            keyed.append((self.render(context), args))

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            for start in range(0, len(todo), ACTIVATION_CHUNK):  # stored chunk by chunk as they are computed
                chunk = todo[start : start + ACTIVATION_CHUNK]
                for m, tensor in enumerate(
                    self.inner.activations([items[k] for k in chunk], layers, positions)
                ):
                    yield start + m, tensor_blob(tensor)

        out: list[Any] = [None] * len(items)
        for k, result in self._through_store("activations", keyed, compute):
            out[k] = blob_tensor(result)
        return out

    def sample_indices(
        self, context: Context, indices: Sequence[int], params: SampleParams
    ) -> Iterator[Sample]:
        """Samples from the store where present; the missing indices drawn in batches, each stored at once."""
        indices = list(indices)
        prompt = self.render(context)
        keyed = [(prompt, {**params.to_json(), "index": i}) for i in indices]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            position = {indices[k]: m for m, k in enumerate(todo)}
            for sample in self.inner.sample_indices(context, [indices[k] for k in todo], params):
                yield position[sample.index], sample.to_json()

        for _, result in self._through_store("sample", keyed, compute):
            yield Sample.from_json(result)

    def token_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, list[float]]]:
        """Per-token log-probabilities of given token ids after each context, through the store."""
        keyed = [(self.render(c), {"token_ids": list(ids)}) for c, ids in items]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            yield from self.inner.token_logprobs([items[k] for k in todo])

        yield from self._through_store("token_logprobs", keyed, compute)

    def support_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int], int | Sequence[Sequence[int]]]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Next-token log-probabilities on a support at each position of given tokens, through the store."""
        keyed = [(self.render(c), {"token_ids": list(ids), "support": sup}) for c, ids, sup in items]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            yield from self.inner.support_logprobs([items[k] for k in todo])

        yield from self._through_store("support_logprobs", keyed, compute)

    def token_ranks(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Log-probability and rank of each given token after each context, through the store."""
        keyed = [(self.render(c), {"token_ids": list(ids)}) for c, ids in items]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            yield from self.inner.token_ranks([items[k] for k in todo])

        yield from self._through_store("token_ranks", keyed, compute)

    def derived(
        self,
        method: str,
        keyed: Sequence[tuple[str, Mapping[str, Any]]],
        compute: Callable[[list[int]], Iterator[tuple[int, Any]]],
    ) -> Iterator[tuple[int, Any]]:
        """A request type computed from this model's uncached calls and other inputs (e.g. a second model's
        distributions), through the store like every other: item k has key parts (method, prompt, args)
        under this model's fingerprint; `args` must hold everything else that changes the result (such as
        the other model's fingerprint). `compute(missing item indices)` yields (position in that list, JSON
        result)."""
        yield from self._through_store(method, keyed, compute)

    def forced_answers(
        self, jobs: Sequence[ForcedJob], *, max_rows: int = 32
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Forced answers at cuts of stored sequences, through the store (batching does not enter the key)."""
        keyed = [(job.seq.prompt_text, job.args()) for job in jobs]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            yield from self.inner.forced_answers([jobs[k] for k in todo], max_rows=max_rows)

        yield from self._through_store("forced_answer", keyed, compute)

    def continuations(
        self, jobs: Sequence[ContinueJob], *, max_rows: int = 32
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Free continuations from cuts of stored sequences, through the store."""
        keyed = [(job.seq.prompt_text, job.args()) for job in jobs]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            yield from self.inner.continuations([jobs[k] for k in todo], max_rows=max_rows)

        yield from self._through_store("continuation", keyed, compute)

    def rewards(self, items: Sequence[tuple[Context, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """A reward model's score of each (conversation, response) item, through the store (keyed by the
        text the reward model reads)."""
        keyed = [(self.inner.render_pair(context, response), {}) for context, response in items]

        def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
            yield from self.inner.rewards([items[k] for k in todo])

        yield from self._through_store("reward", keyed, compute)
