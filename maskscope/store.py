"""The store: a SQLite, content-addressed cache of every model call, and the record of runs.

A call's key is the SHA-256 of its parts (the model's fingerprint, the rendered prompt, the method, its
arguments, the seed and the sample index), written as canonical JSON. Each result is committed as soon as it
exists, so a run killed at any point resumes with nothing computed twice. Errors are never stored."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    parts TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    writes INTEGER NOT NULL DEFAULT 1
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


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal parts always give the same key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def call_key(parts: Mapping[str, Any]) -> str:
    """The content address of a call."""
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


@dataclass
class Explanation:
    """A stored call's parts, and the nearest call stored before it, with the fields that differ."""

    key: str
    stored: bool
    parts: dict[str, Any] | None
    nearest_key: str | None = None
    differences: dict[str, tuple[Any, Any]] | None = None


class Store:
    """A SQLite file of model-call results and run records. Safe to reopen after a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()
        self.run: str | None = None

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def get(self, key: str, method: str = "") -> Any | None:
        """The stored result of a call, or None; the lookup is recorded against the current run."""
        row = self.db.execute("SELECT result FROM calls WHERE key = ?", (key,)).fetchone()
        if self.run is not None:
            self.db.execute(
                "INSERT OR REPLACE INTO lookups(run, key, method, hit) VALUES (?, ?, ?, ?)",
                (self.run, key, method, int(row is not None)),
            )
        return None if row is None else json.loads(row[0])

    def put(self, key: str, parts: Mapping[str, Any], result: Any) -> None:
        """Store a result and commit at once. A second write of the same key is counted in `writes`."""
        self.db.execute(
            "INSERT INTO calls(key, method, parts, result, created) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET result = excluded.result, writes = writes + 1",
            (key, parts["method"], canonical(parts), canonical(result), time.time()),
        )
        self.db.commit()

    def count(self, method: str | None = None) -> int:
        """How many calls are stored (of one method, if given)."""
        if method is None:
            return int(self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM calls WHERE method = ?", (method,)).fetchone()[0])

    def writes(self) -> dict[str, int]:
        """Key -> how many times its result was written (1 for every call computed once)."""
        return {k: int(w) for k, w in self.db.execute("SELECT key, writes FROM calls")}

    def parts(self, key: str) -> dict[str, Any] | None:
        """The parts a stored key was made from."""
        row = self.db.execute("SELECT parts FROM calls WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def find_keys(self, prefix: str) -> list[str]:
        """Stored or looked-up keys that start with a prefix."""
        rows = self.db.execute(
            "SELECT key FROM calls WHERE key LIKE ? UNION SELECT key FROM lookups WHERE key LIKE ?",
            (prefix + "%", prefix + "%"),
        ).fetchall()
        return sorted(r[0] for r in rows)

    def explain(self, key: str) -> Explanation:
        """Why a call had to be computed: its parts, and the call of the same method stored before it
        whose parts differ least, with the fields that differ. A key that was looked up but never
        computed (an interrupted run) has no parts."""
        row = self.db.execute("SELECT parts, created FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return Explanation(key, False, None)
        parts, created = json.loads(row[0]), row[1]
        mine = _flatten(parts)
        best: tuple[int, str, dict[str, tuple[Any, Any]]] | None = None
        for other_key, other_parts in self.db.execute(
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
        rows = self.db.execute("SELECT key, method, hit FROM lookups WHERE run = ? ORDER BY rowid", (run,))
        return [(k, m, bool(h)) for k, m, h in rows]

    # ------------------------------------------------------------------ runs
    def start_run(self, name: str, spec: Mapping[str, Any]) -> None:
        """Record that a run started (or restarted); lookups from now on are recorded against it."""
        self.run = name
        self.db.execute("DELETE FROM lookups WHERE run = ?", (name,))
        self.db.execute(
            "INSERT INTO runs(name, spec, status, started) VALUES (?, ?, 'running', ?) "
            "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, status = 'running', started = excluded.started,"
            " finished = NULL",
            (name, canonical(spec), time.time()),
        )
        self.db.commit()

    def finish_run(self, name: str, status: str = "done") -> None:
        """Record how a run ended, with its cache hit and miss counts."""
        hits, total = self.db.execute(
            "SELECT COALESCE(SUM(hit), 0), COUNT(*) FROM lookups WHERE run = ?", (name,)
        ).fetchone()
        self.db.execute(
            "UPDATE runs SET status = ?, finished = ?, hits = ?, misses = ? WHERE name = ?",
            (status, time.time(), hits, total - hits, name),
        )
        self.db.commit()

    def run_record(self, name: str) -> dict[str, Any] | None:
        """A run's record: spec, status, start and end times, cache hits and misses."""
        row = self.db.execute(
            "SELECT spec, status, started, finished, hits, misses FROM runs WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        spec, status, started, finished, hits, misses = row
        return {
            "spec": json.loads(spec),
            "status": status,
            "started": started,
            "finished": finished,
            "hits": hits,
            "misses": misses,
        }


class CachedModel(ModelAPI):
    """A model whose every call goes through the store: answered from it when the key is there, else
    computed, written at once, and returned. Offers the same API as the model it wraps.

    The calls that produce results are request types with keys (`CACHED`); the calls that only describe
    the model or its text side are forwarded (`FORWARDED`). Anything else is an AttributeError, never a
    silent uncached call."""

    CACHED = (
        "score_many",
        "next_token_distributions",
        "sample_indices",
        "token_logprobs",
        "support_logprobs",
        "forced_answers",
        "continuations",
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
            "steer",  # the steering enters the fingerprint, and so every key, while it is active
            "activations",  # not stored yet: computed on every call
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
