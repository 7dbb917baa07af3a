"""The family commands (``qconvert flux`` …), ``model``, ``plan`` and ``inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qconvert.cli.common import (
    PUSH_OPTIONS,
    F,
    FormatType,
    SizeType,
    base_model_option,
    command_line,
    device_option,
    quiet_libraries,
    selection_options,
    stack,
)
from qconvert.cli.hub import push_and_report, push_options, push_preflight
from qconvert.errors import QconvertError
from qconvert.sizes import human_size


def convert_options(f: F) -> F:
    """Options every convert command takes."""
    options = [
        click.option(
            "--format",
            "fmt",
            type=FormatType(),
            required=True,
            help="Weight format (a --recipe file may set others per layer).",
        ),
        click.option("--revision", default=None, help="Hub branch, tag or commit (Hub sources)."),
        click.option(
            "-o",
            "--output",
            type=click.Path(path_type=Path),
            default=None,
            help="Output folder [default: ./<source name>-<format>].",
        ),
        device_option("Where to quantize."),
        selection_options,
        click.option(
            "--transformer-only",
            is_flag=True,
            help="Write only the transformer folder (no other pipeline components).",
        ),
        click.option(
            "--max-shard-size",
            type=SizeType(),
            default="5GB",
            show_default=True,
            help="Largest output shard file (memory use does not depend on it: tensors are "
            "streamed).",
        ),
        base_model_option,
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue an interrupted run: reuse its finished shards (hash-checked).",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
        push_options,
    ]
    return stack(options, f)


def _run_convert(family: str, source: str | None, stem: str, opts: dict[str, Any]) -> None:
    output = opts.pop("output") or Path(f"{stem}-{opts['fmt'].name}")
    quiet = opts.pop("quiet")
    hub = {key: opts.pop(key) for key in ("push", *PUSH_OPTIONS)}
    quiet_libraries()
    from qconvert.convert import convert

    account = push_preflight(hub, quiet)
    result = convert(
        output, family=family, source=source, progress=not quiet, command=command_line(), **opts
    )
    s = result.plan.summary()
    recipe = result.plan.recipe
    click.echo(
        f"wrote {result.output} ({', '.join(result.plan.formats)}; recipe {recipe.name}): "
        f"{s['quantized_layers']}/{s['linear_layers']} Linear layers quantized "
        f"({float(s['quantized_share']):.1%} of params), transformer "
        f"{human_size(int(s['bf16_bytes']))} bf16 → {human_size(int(s['output_bytes']))} "
        f"({float(s['size_ratio']):.2f}×) in {result.seconds:.1f} s"
    )
    for line in load_hint(result.output, result.plan.formats):
        click.echo(line)
    if account is not None:
        try:
            push_and_report(result.output, hub, account)
        except QconvertError as e:
            raise click.ClickException(f"{e} (the output is in {result.output})") from None


def load_hint(output: Path, formats: list[str]) -> list[str]:
    """How to load ``output``, for this machine: plain diffusers first where the weights run as
    saved here, else ``qconvert.loaders`` (which picks the path this device runs). Every snippet
    runs as printed."""
    import torch

    from qconvert.formats import FORMATS
    from qconvert.loaders.runtime import DEVICE_LABELS, NATIVE_PATH, TABLE, device_class

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = device_class(device)
    kinds = [FORMATS[f].tensor_type() for f in formats]
    native = [
        DEVICE_LABELS[d].split(" (")[0]
        for d in DEVICE_LABELS
        if all(TABLE[(k, d)].name == NATIVE_PATH for k in kinds)
    ]
    out = str(output)
    if (output / "config.json").exists():  # a lone transformer
        ours = f"from qconvert.loaders import load_transformer; t = load_transformer({out!r})"
        plain = (
            f"import torch; from diffusers import AutoModel; "
            f"t = AutoModel.from_pretrained({out!r}, dtype=torch.bfloat16)"
        )
    else:
        ours = f"from qconvert.loaders import load_pipeline; pipe = load_pipeline({out!r})"
        plain = (
            f"import torch; from diffusers import DiffusionPipeline; "
            f"pipe = DiffusionPipeline.from_pretrained({out!r}, dtype=torch.bfloat16)"
        )
    if all(TABLE[(k, here)].name == NATIVE_PATH for k in kinds):
        return [
            "load it with (plain diffusers runs these weights as saved on this GPU):",
            f"  {plain}",
            "or, on any device (picks the kernels it runs):",
            f"  {ours}",
        ]
    return [
        f"load it with (qconvert.loaders picks what runs on {DEVICE_LABELS[here]}):",
        f"  {ours}",
        f"plain diffusers loads it too, but runs it as saved only on {' and '.join(native)}:",
        f"  {plain}",
    ]


def _family_command(family: str) -> click.Command:
    from qconvert.convert.recipes import families

    recipe = families()[family]

    @click.command(
        name=family,
        help=f"""Convert the {recipe.transformer_class} of {recipe.title} pipelines to a quantized
        checkpoint: Linear weights become torchao tensors bit-exact with what torchao builds on
        Blackwell; every other file is copied, so `DiffusionPipeline.from_pretrained(OUT)` works.

        \b
        Examples:
          qconvert {family} --format nvfp4 --tiny -o out/tiny-{family}-nvfp4
          qconvert {family} --format mxfp8 --source ./local-pipeline -o out/{family}-mxfp8
          qconvert {family} --format nvfp4 --source {recipe.default_source} --revision main
          qconvert {family} --format nvfp4 --tiny --recipe mixed.toml -o out/mixed
        """,
    )
    @click.option(
        "--source",
        default=None,
        metavar="PATH|REPO",
        help=f"Local diffusers folder or Hub repo id [default: {recipe.default_source}].",
    )
    @click.option(
        "--tiny",
        is_flag=True,
        help="Convert the embedded tiny pipeline (real classes, seeded random "
        "weights; offline, seconds).",
    )
    @convert_options
    def command(source: str | None, tiny: bool, **opts: Any) -> None:
        if tiny and source:
            raise click.UsageError("--tiny and --source exclude each other")
        if tiny and opts["revision"]:
            raise click.UsageError("--revision applies to Hub sources, not --tiny")
        src = None if tiny else (source or recipe.default_source)
        stem = f"tiny-{family}" if tiny else Path(str(src).rstrip("/")).name
        _run_convert(family, src, stem, opts)

    return command


@click.command()
@click.argument("source", metavar="SOURCE")
@convert_options
def model(source: str, **opts: Any) -> None:
    """Convert any diffusers pipeline or transformer folder (local path or Hub repo id).

    Uses the family recipe when the transformer class has one, else the generic recipe:
    quantize the Linear layers inside the model's repeated blocks (its `_repeated_blocks`),
    keep everything outside them, with the size and shape rules. It says which it used.

    \b
    Examples:
      qconvert model ./my-dit-pipeline --format nvfp4 -o my-dit-nvfp4
      qconvert model org/some-dit --revision main --format mxfp8 --only 're:\\.ff\\.'
    """
    _run_convert("auto", source, Path(source.rstrip("/")).name, opts)


@click.command()
@click.argument("target", metavar="FAMILY|SOURCE")
@click.option("--format", "fmt", type=FormatType(), required=True, help="Weight format.")
@click.option(
    "--source", default=None, metavar="PATH|REPO", help="Family's source [default: its Hub repo]."
)
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--tiny", is_flag=True, help="Plan the family's embedded tiny pipeline.")
@click.option(
    "--real-config",
    is_flag=True,
    help="Plan the family's real architecture from the config the recipe records (no "
    "download at all).",
)
@selection_options
@click.option(
    "--all", "every_layer", is_flag=True, help="List every layer (default: blocks collapsed)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every layer).")
def plan(target: str, as_json: bool, every_layer: bool, **opts: Any) -> None:
    """Show what a conversion would do, reading only safetensors headers: per-layer decision
    and reason (repeated blocks collapsed to blocks.N; --all for every layer), the parameter
    share quantized and the estimated size vs bf16. Seconds.

    \b
    Examples:
      qconvert plan flux --format nvfp4 --tiny
      qconvert plan qwenimage --format nvfp4 --real-config --json
      qconvert plan ./my-dit-pipeline --format mxfp8 --skip 'blocks.0.'
    """
    quiet_libraries()
    from qconvert.convert import plan_target, selection_for
    from qconvert.inspect import render_plan

    chosen = selection_for(opts.pop("skips"), opts.pop("only"), opts.pop("recipe_file"))
    try:
        result = plan_target(target, opts.pop("fmt"), chosen, **opts)
    except QconvertError as e:
        if str(e).startswith("--source, --tiny"):
            raise click.UsageError(str(e)) from None
        raise
    click.echo(render_plan(result, as_json, every_layer))


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every file's sha256 against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(path: Path, verify: bool, as_json: bool) -> None:
    """Show a qconvert output: per-layer table, sizes, versions, bytes saved vs bf16.

    \b
    Example:
      qconvert inspect out/tiny-flux-nvfp4 --verify
    """
    from qconvert import manifest as mf
    from qconvert.inspect import render

    text, data = render(path)
    if verify:
        mf.verify(path, data)
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(text)
    if verify:
        click.echo(f"verified {len(data['files'])} files against the manifest")


def commands() -> list[click.Command]:
    from qconvert.convert.recipes import families

    return [*(_family_command(f) for f in families()), model, plan, inspect]
