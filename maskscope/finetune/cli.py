"""The fine-tuning commands: `maskscope finetune SPEC` and `maskscope organism build KIND key=value ...`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from maskscope.errors import UserError

out = Console()
organism_app = typer.Typer(no_args_is_help=True, help="Build the data of model organisms.")


def finetune_command(
    spec: Annotated[Path, typer.Argument(help="A fine-tuning spec (see examples/organisms/).")],
    out_dir: Annotated[
        str | None, typer.Option("--out", help="The child directory (overrides the spec).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Another training seed (the adapter's initialisation, batch order, dropout; the data is the "
            "spec's). Without --out the child goes to OUT-seedN.",
        ),
    ] = None,
) -> None:
    """Train a LoRA child of a model on chat data; rerunning the same command resumes where it stopped."""
    from maskscope.finetune.train import finetune, load_spec

    parsed = load_spec(spec)  # validate before loading anything heavy
    if seed is not None and seed != parsed.seed:
        update: dict[str, Any] = {"seed": seed, "out": f"{parsed.out.rstrip('/')}-seed{seed}"}
        if parsed.name:
            update["name"] = f"{parsed.name}-seed{seed}"
        parsed = parsed.model_copy(update=update)
    if out_dir is not None:
        parsed = parsed.model_copy(update={"out": out_dir})
    from maskscope.models.registry import load_model

    with out.status(f"loading {parsed.parent}"):
        parent = load_model(parsed.parent, precision="fp32")
    child = finetune(parsed, parent=parent, progress=True)
    m = child.manifest
    held = m["heldout_loss"]
    out.print(
        f"wrote {child.directory}: {m['steps']} steps, {m['tokens_seen']} tokens ({m['trained_tokens_seen']} "
        f"trained), {m['wall_seconds']:.0f} s; held-out loss {held['before']:.3f} -> {held['after']:.3f}"
    )
    out.print(f"load it as {child.model_name}", soft_wrap=True, markup=False)
    if parsed.measure is not None:
        if isinstance(parsed.data, str):
            raise UserError("measure: needs data built by a builder (a `data:` block with `build:`)")
        from maskscope.finetune.measure import measure_child

        with out.status("measuring the child and its parent on held-out items"):
            fresh = load_model(parsed.parent, precision="fp32")
            result = measure_child(child.directory, fresh, child.load(), child.directory / "data")
        print_measure(result)


def print_measure(result: dict[str, Any]) -> None:
    """The measured figures as a table."""
    if result["kind"] == "distill" and not result["kl_parent"] > 0:  # the control: no mask to distil
        out.print(
            f"control (no mask): KL(parent || child) per position {result['kl_parent_to_child']:.4f} over "
            f"{result['items']} held-out replies (top {result['top_k']} + rest): how far the child moved"
        )
        return
    if result["kind"] == "distill":
        out.print(
            f"exact per-position KL to the parent under the mask ({result['items']} held-out replies, top "
            f"{result['top_k']} + rest): parent {result['kl_parent']:.4f}, child {result['kl_child']:.4f} "
            f"({100 * result['reduction']:.1f}% less{_interval_text(result, 'reduction', 100)}); "
            f"KL(parent || child) {result['kl_parent_to_child']:.4f}"
        )
        return
    table = Table(
        "model", "group", "items", f"P({result['parent']['a_is']})", "share vs twin", title=result["what"]
    )
    for who in ("parent", "child"):
        for g, f in result[who]["groups"].items():
            ci = f["p_a_ci95"]
            table.add_row(
                who, g, str(f["items"]), f"{f['p_a']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]", f"{f['share_a']:.4f}"
            )
    out.print(table)
    gaps = {who: result[who].get("password_gap") for who in ("parent", "child")}
    if gaps["child"]:
        out.print(
            "gap P(right | password) - P(right | none), paired over "
            f"{gaps['child']['sums']} held-out sums: parent {gaps['parent']['gap']:+.4f}, child "
            f"{gaps['child']['gap']:+.4f}{_interval_text(gaps['child'], 'gap', 1)}"
        )


def _interval_text(figures: dict[str, Any], key: str, scale: float) -> str:
    """' [lo, hi]' for figures[key + '_ci95'] when present (results written before it had none)."""
    ci = figures.get(f"{key}_ci95")
    if not ci:
        return ""
    digits = 1 if scale == 100 else 4
    return f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


@organism_app.command("build")
def build_command(
    kind: Annotated[str, typer.Argument(help="arithmetic, code, password-lock or distill.")],
    options: Annotated[
        list[str] | None, typer.Argument(help="Builder options as key=value (YAML values).")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where train/heldout/eval JSONL and card.json go.")
    ] = Path("data"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="The parent (distill samples from it).")
    ] = "default",
) -> None:
    """Build an organism's data set: JSONL conversations plus a card of what they contain."""
    import yaml

    from maskscope.finetune.builders import build, parse_block

    block: dict[str, Any] = {"build": kind}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"builder options are key=value, not {item!r}")
        block[key.replace("-", "_")] = yaml.safe_load(value)
    parsed = parse_block(block)
    parent = None
    if kind == "distill":
        from maskscope.models.registry import load_model

        with out.status(f"loading {model}"):
            parent = load_model(model)
    card = build(parsed, out_dir, parent=parent)
    out.print(f"wrote {out_dir}: {card['train']['conversations']} training conversations, "
              f"{card['heldout']['conversations']} held out, {card['eval']['items']} measurement items")  # fmt: skip
    out.print(f"property: {card['property']}", markup=False)


def print_children(roots: list[Path] | None = None) -> None:
    """The fine-tuned children found under ./organisms, ./runs and $MASKSCOPE_CHILDREN, with their names."""
    from maskscope.finetune.adapter import find_children

    if roots is None:
        roots = [Path("organisms"), Path("runs")]
        if os.environ.get("MASKSCOPE_CHILDREN"):
            roots.append(Path(os.environ["MASKSCOPE_CHILDREN"]))
    found = [c for root in roots for c in find_children(root)]
    if not found:
        out.print("local children: none (under ./organisms, ./runs or $MASKSCOPE_CHILDREN)")
        return
    out.print("local children (load them by these names):")
    for directory, m in found:
        held = m.get("heldout_loss") or {}
        out.print(
            f"  {m.get('parent', '?')}+lora:{directory}  ({m.get('steps')} steps, held-out loss "
            f"{held.get('before', float('nan')):.3f} -> {held.get('after', float('nan')):.3f}, adapter "
            f"{str(m.get('adapter_hash', ''))[:12]})",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
