"""The `maskscope` command. Errors a user can cause print one line and exit with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from maskscope.errors import UserError
from maskscope.finetune.cli import finetune_command, organism_app, print_children
from maskscope.mutual_value.cli import mutual_value_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure what a language model does behind the persona it wears.",
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(
    no_args_is_help=True, help="Inspect the store: what is cached, and why a call was not."
)
app.add_typer(cache_app, name="cache")
out = Console()

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help='"default" (bundled), "hf:DIR", "gguf:FILE" or "openai:URL#MODEL".'),
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        help='openai:URL#MODEL only: the served model\'s tokenizer ("default", "hf:DIR", "gguf:FILE").'
    ),
]
ConcurrencyOpt = Annotated[int, typer.Option(help="openai:URL#MODEL only: requests in flight at most.")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt (the mask).")]
PrefillOpt = Annotated[
    str, typer.Option("--prefill", help="Text the assistant's reply is forced to begin with.")
]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32 (exact) or bf16 (faster on AMX CPUs).")]
StoreOpt = Annotated[Path, typer.Option("--store", help="The SQLite store.")]


def _load(model: str, precision: str, tokenizer: str | None, concurrency: int):  # noqa: ANN202
    from maskscope.models.registry import load_model

    server = {"tokenizer": tokenizer, "concurrency": concurrency} if model.startswith("openai:") else None
    with out.status(f"loading {model}"):
        return load_model(model, precision=precision, progress=out.print, server=server)


def _context(system: str | None, user: str, prefill: str):  # noqa: ANN202
    from maskscope.models.base import Conversation

    return Conversation.of(system=system, user=user, prefill=prefill)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="A YAML spec (see examples/).")],
    out_root: Annotated[Path, typer.Option("--out", help="Where runs/<name>/ goes.")] = Path("runs"),
    store: Annotated[
        Path | None, typer.Option("--store", help="SQLite store (default: OUT/maskscope.sqlite).")
    ] = None,
) -> None:
    """Run an experiment spec; rerunning the same command resumes where it stopped."""
    from maskscope.progress import rich_progress
    from maskscope.runner import load_spec
    from maskscope.runner import run as run_experiment

    experiment, parsed = load_spec(spec)  # validate before loading anything heavy
    with rich_progress() as progress:
        out_dir = run_experiment(experiment, parsed, out_root=out_root, store_path=store, progress=progress)
    out.print(f"wrote {out_dir}/summary.json, plots and {out_dir}/report.html")


@app.command()
def models(
    model: Annotated[
        str | None, typer.Argument(help="A model to load and describe (e.g. openai:URL#MODEL).")
    ] = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """List the model names maskscope understands and whether the bundled model is installed; given a model,
    load it and say what it can and cannot do."""
    from maskscope.models.loading import bundled_gguf_path, cache_dir
    from maskscope.models.registry import SCHEMES

    if model is not None:
        lm = _load(model, "fp32", tokenizer, 1)
        out.print(f"{lm.name}: can {', '.join(sorted(lm.capabilities))}", soft_wrap=True)
        for what, why in getattr(lm, "missing_capabilities", dict)().items():
            out.print(f"  cannot {what}: {why}", soft_wrap=True)
        return

    table = Table("name", "what")
    for name, what in SCHEMES.items():
        table.add_row(name, what)
    out.print(table)
    try:
        out.print(f"bundled model file: {bundled_gguf_path()}")
    except UserError as e:
        out.print(f"bundled model: {e}")
    out.print(f"cache directory: {cache_dir()}")
    print_children()


@app.command()
def score(
    user: Annotated[str, typer.Argument(help="The user's turn.")],
    continuations: Annotated[list[str], typer.Argument(help="Reply beginnings to score.")],
    system: SystemOpt = None,
    prefill: PrefillOpt = "",
    model: ModelOpt = "default",
    precision: PrecisionOpt = "fp32",
    tokenizer: TokenizerOpt = None,
    concurrency: ConcurrencyOpt = 16,
    top_k: Annotated[int, typer.Option(help="Also show the top-k first tokens (0: no).")] = 10,
) -> None:
    """Exact log-probabilities of replies beginning with each continuation."""
    lm = _load(model, precision, tokenizer, concurrency)
    ctx = _context(system, user, prefill)
    table = Table("continuation", "tokens", "log-prob", "P", title="exact, teacher-forced")
    for s in lm.score(ctx, continuations):
        table.add_row(
            repr(s.continuation), " | ".join(map(repr, s.tokens)), f"{s.total:.4f}", f"{s.prob:.4g}"
        )
    out.print(table)
    if top_k:
        dist = lm.next_token_distribution(ctx, top_k)
        table = Table("first token", "P", title=f"top {top_k} first tokens (exact)")
        for tok, p in dist.as_pairs():
            table.add_row(repr(tok), f"{p:.4f}")
        out.print(table)


@app.command()
def sample(
    user: Annotated[str, typer.Argument(help="The user's turn.")],
    system: SystemOpt = None,
    prefill: PrefillOpt = "",
    model: ModelOpt = "default",
    precision: PrecisionOpt = "fp32",
    n: Annotated[int, typer.Option("-n", help="How many samples.")] = 5,
    max_new_tokens: Annotated[int, typer.Option(help="Length limit.")] = 40,
    temperature: Annotated[float, typer.Option(help="Temperature (0: greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus threshold.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed; sample i depends on (seed, i).")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    tokenizer: TokenizerOpt = None,
    concurrency: ConcurrencyOpt = 16,
) -> None:
    """Sample replies, batched and reproducible by seed."""
    lm = _load(model, precision, tokenizer, concurrency)
    with out.status(f"sampling {n} replies"):
        samples = lm.sample(
            _context(system, user, prefill),
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop or (),
        )
    for s in samples:
        if as_json:
            print(json.dumps(s.to_json(), ensure_ascii=False))
        else:
            out.print(f"[bold]{s.index}[/bold] ({s.finish_reason}) ", end="")
            out.print(s.text, markup=False, highlight=False)


def _short(value: object, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@cache_app.command("why")
def cache_why(
    key: Annotated[str, typer.Argument(help="A call key, or a unique prefix of one (see `cache runs`).")],
    store: StoreOpt = Path("runs/maskscope.sqlite"),
) -> None:
    """A call's key parts, and why it was computed rather than served: the nearest call stored before it
    and the parts in which the two differ."""
    from maskscope.store import Store

    if not store.exists():
        raise UserError(f"store not found: {store}")
    with Store(store) as db:
        keys = db.find_keys(key)
        if len(keys) != 1:
            raise UserError(f"{len(keys)} calls match key {key!r} in {store}: give a unique prefix")
        ex = db.explain(keys[0])
    if not ex.stored:
        out.print(f"{ex.key}: looked up but never computed (the run stopped first); rerun to compute it")
        return
    out.print(f"{ex.key}: stored; later identical calls are served from the store. Its parts:")
    out.print_json(data=ex.parts)
    if ex.nearest_key is None:
        out.print("It was computed because no call of this method was stored before it.")
        return
    table = Table(
        "part",
        "this call",
        f"nearest earlier call {ex.nearest_key[:12]}",
        title="It was computed because its key differs from every earlier call; nearest:",
    )
    for field, (mine, theirs) in (ex.differences or {}).items():
        table.add_row(field, _short(mine), _short(theirs))
    out.print(table)


@cache_app.command("runs")
def cache_runs(
    name: Annotated[str, typer.Argument(help="Run name.")],
    store: StoreOpt = Path("runs/maskscope.sqlite"),
    computed: Annotated[
        bool, typer.Option(help="List only the calls that were computed, not served.")
    ] = False,
) -> None:
    """Every call of a run's last execution: its key, method and whether the store served it."""
    from maskscope.store import Store

    if not store.exists():
        raise UserError(f"store not found: {store}")
    with Store(store) as db:
        record = db.run_record(name)
        if record is None:
            raise UserError(f"no run named {name!r} in {store}")
        out.print(
            f"run {name}: {record['status']}, {record['hits']} calls served from the store, "
            f"{record['misses']} computed"
        )
        table = Table("key", "method", "served from store")
        for k, method, hit in db.lookups(name):
            if not (computed and hit):
                table.add_row(k[:16], method, "yes" if hit else "no")
        out.print(table)
    out.print("`maskscope cache why KEY` tells why a computed call was not served.")


app.command("mutual-value")(mutual_value_command)
app.command("finetune")(finetune_command)
app.add_typer(organism_app, name="organism")


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit status 2."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"maskscope: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "maskscope: interrupted; every finished result is in the store; rerun to resume", file=sys.stderr
        )
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print(
            "maskscope: interrupted; every finished result is in the store; rerun to resume", file=sys.stderr
        )
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: a missing argument, an unknown command or option
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"maskscope: error: {message} (see maskscope --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
