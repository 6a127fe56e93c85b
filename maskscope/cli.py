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
from maskscope.runs_cli import runs_app, view_command

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


def _version(value: bool) -> None:
    if value:
        from maskscope import __version__

        print(f"maskscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Measure what a language model does behind the persona it wears."""


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
KeyEnvOpt = Annotated[
    str,
    typer.Option(
        "--api-key-env",
        help="openai:URL#MODEL only: the environment variable holding the API key (a spec cannot choose it).",
    ),
]
OpenAIKeyOpt = Annotated[
    bool,
    typer.Option(
        "--use-openai-api-key",
        help="openai:URL#MODEL only: also read OPENAI_API_KEY when the --api-key-env variable is unset.",
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--allow-insecure-key",
        help="openai:URL#MODEL only: allow sending the API key over plain http to another machine.",
    ),
]
INTERRUPTED = "interrupted: rerun the same command to resume"


def _credentials(key_env: str, use_openai_key: bool, allow_insecure: bool):  # noqa: ANN202
    from maskscope.models.openai_backend import Credentials

    if not key_env or not key_env.replace("_", "").isalnum():
        raise UserError(f"--api-key-env must name an environment variable, not {key_env!r}")
    return Credentials(key_env=key_env, openai_fallback=use_openai_key, allow_insecure=allow_insecure)


def _load(model: str, precision: str, tokenizer: str | None, concurrency: int, credentials=None):  # noqa: ANN001, ANN202
    from maskscope.models.registry import check_model_name, load_model

    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, not {precision!r}")
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, not {concurrency}")
    check_model_name(model)
    server = {"tokenizer": tokenizer, "concurrency": concurrency} if model.startswith("openai:") else None
    with out.status("loading model"):
        return load_model(
            model, precision=precision, progress=out.print, server=server, credentials=credentials
        )


def _context(system: str | None, user: str, prefill: str):  # noqa: ANN202
    from maskscope.models.base import Conversation

    return Conversation.of(system=system, user=user, prefill=prefill)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="A YAML spec (see examples/); its paths are relative to it.")],
    out_root: Annotated[Path, typer.Option("--out", help="Where runs/<name>/ goes.")] = Path("runs"),
    store: Annotated[
        Path | None, typer.Option("--store", help="SQLite store (default: OUT/maskscope.sqlite).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Run this model instead of the spec's (paths: from here)."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="Only the first N items the experiment iterates (prompts, pressures, problems)."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change a spec field: path.to.field=value (YAML value; repeatable; list items by index).",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads (1 is often fastest on a shared machine).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Local models: cpu, cuda, cuda:N, mps or auto.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Local models: float32, bfloat16, float16 or auto.")
    ] = None,
    batch_tokens: Annotated[
        int | None, typer.Option(help="Local models: tokens per batch (default: from free GPU memory).")
    ] = None,
    api_key_env: KeyEnvOpt = "MASKSCOPE_API_KEY",
    use_openai_api_key: OpenAIKeyOpt = False,
    allow_insecure_key: InsecureOpt = False,
) -> None:
    """Run an experiment spec; rerunning the same command resumes where it stopped."""
    from maskscope.progress import cli_progress
    from maskscope.runner import load_spec
    from maskscope.runner import run as run_experiment

    credentials = _credentials(api_key_env, use_openai_api_key, allow_insecure_key)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}")
    flags = {"model": model, "device": device, "dtype": dtype, "batch_tokens": batch_tokens}
    changes = [*(sets or []), *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]
    experiment, parsed = load_spec(spec, changes, limit)  # validate before loading anything heavy
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with cli_progress() as progress:
        out_dir = run_experiment(
            experiment,
            parsed,
            out_root=out_root,
            store_path=store,
            progress=progress,
            credentials=credentials,
        )
    out.print(
        f"wrote {out_dir}/summary.json, plots and {out_dir}/report.html",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def models(
    model: Annotated[
        str | None, typer.Argument(help="A model to load and describe (e.g. openai:URL#MODEL).")
    ] = None,
    tokenizer: TokenizerOpt = None,
    api_key_env: KeyEnvOpt = "MASKSCOPE_API_KEY",
    use_openai_api_key: OpenAIKeyOpt = False,
    allow_insecure_key: InsecureOpt = False,
) -> None:
    """List the model names maskscope understands and whether the bundled model is installed; given a model,
    load it and say what it can and cannot do."""
    from maskscope.models.loading import bundled_gguf_path, cache_dir, hub_cache_dir
    from maskscope.models.registry import SCHEMES

    if model is not None:
        credentials = _credentials(api_key_env, use_openai_api_key, allow_insecure_key)
        lm = _load(model, "fp32", tokenizer, 1, credentials)
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
    out.print(f"Hugging Face hub cache (hf:ORG/NAME): {hub_cache_dir()}", soft_wrap=True)
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
    api_key_env: KeyEnvOpt = "MASKSCOPE_API_KEY",
    use_openai_api_key: OpenAIKeyOpt = False,
    allow_insecure_key: InsecureOpt = False,
) -> None:
    """Exact log-probabilities of replies beginning with each continuation."""
    if top_k < 0:
        raise UserError(f"--top-k must be 0 (none) or more, not {top_k}")
    if any(not c for c in continuations):
        raise UserError("continuations must be non-empty strings")
    credentials = _credentials(api_key_env, use_openai_api_key, allow_insecure_key)
    lm = _load(model, precision, tokenizer, concurrency, credentials)
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
    api_key_env: KeyEnvOpt = "MASKSCOPE_API_KEY",
    use_openai_api_key: OpenAIKeyOpt = False,
    allow_insecure_key: InsecureOpt = False,
) -> None:
    """Sample replies, batched and reproducible by seed."""
    import math

    if n < 1:
        raise UserError(f"-n must be at least 1, not {n}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), not {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], not {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    credentials = _credentials(api_key_env, use_openai_api_key, allow_insecure_key)
    lm = _load(model, precision, tokenizer, concurrency, credentials)
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
    from rich.text import Text

    from maskscope.keydiff import call_summary, differences, groups

    out.print(f"{ex.key}: stored; later identical calls are served from the store. Its parts:")
    for name, text in call_summary(ex.parts or {}):
        out.print(f"  {name}: {text}", markup=False, highlight=False, soft_wrap=True)
    if ex.nearest_key is None:
        out.print("It was computed because no call of this method was stored before it.")
        return
    diffs = differences(ex.differences or {})
    out.print(
        f"It was computed because its key differs from every earlier call; the nearest, {ex.nearest_key[:12]}, "
        f"differs in {len(diffs)} part(s), in: {', '.join(groups([d.part for d in diffs]))}",
        markup=False,
        highlight=False,
    )
    table = Table("part", "this call", f"nearest earlier call {ex.nearest_key[:12]}")
    for d in diffs:
        table.add_row(Text(d.part), Text(d.mine), Text(d.theirs))  # text from the store is not markup
    out.print(table)
    for d in diffs:
        if d.detail is not None:
            out.print(
                f"{d.part}: first difference at {d.detail.unit} {d.detail.at}:", markup=False, highlight=False
            )
            out.print(f"  this call: {d.detail.mine}", markup=False, highlight=False, soft_wrap=True)
            out.print(f"  nearest:   {d.detail.theirs}", markup=False, highlight=False, soft_wrap=True)


@cache_app.command("check")
def cache_check(store: StoreOpt = Path("runs/maskscope.sqlite")) -> None:
    """Check a store without changing it: SQLite's integrity check of the file, and every stored result
    against its checksum. Exit status 1 when something is damaged."""
    from maskscope.store import check_store

    report = check_store(store)
    version = "unreadable" if report.schema_version < 0 else f"schema {report.schema_version}"
    out.print(f"{store}: {report.results} stored results, {version}", markup=False, highlight=False)
    if report.file_ok:
        out.print("file: ok (SQLite integrity check)")
    else:
        out.print(f"file: damaged ({report.file_problem})", markup=False, highlight=False)
    out.print(
        f"results: {len(report.damaged)} fail their checksum or do not parse"
        + (" (never served: a run treats them as missing and recomputes them)" if report.damaged else "")
    )
    if not report.ok:
        out.print(f"`maskscope cache repair --store {store}` salvages every sound result into a new file.")
        raise typer.Exit(1)


@cache_app.command("repair")
def cache_repair(store: StoreOpt = Path("runs/maskscope.sqlite")) -> None:
    """Salvage a damaged store: every result that can be read and passes its checksum goes into a new file
    that replaces it; the damaged file is kept beside it. Rerunning then recomputes what was lost."""
    from maskscope.store import repair_store

    report = repair_store(store)
    out.print(
        f"kept {report.kept} results and {report.runs} run records; dropped {report.dropped} damaged results; "
        f"the old file is {report.moved_to}. Rerun to recompute what was dropped.",
        markup=False,
        highlight=False,
    )


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
app.add_typer(runs_app, name="runs")
app.command("view")(view_command)


def one_line(message: str) -> str:
    """A message as one line: control characters (a newline or vertical tab in a file name...) escaped."""
    import unicodedata

    return "".join(
        c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii")
        for c in message
    )


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit status 2."""
    try:
        code = app(standalone_mode=False)  # without standalone mode, click returns typer.Exit's code
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            print(INTERRUPTED, file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        print(f"maskscope: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: a missing argument, an unknown command or option
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"maskscope: error: {one_line(message)} (see maskscope --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
