"""The ``qconvert`` command line: a thin Click layer over ``qconvert.convert`` and friends."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from pathlib import Path

import click

# Before torchao is imported: its loader logs a warning per unbuilt CUDA extension, and torch
# warns about enum registration; neither is actionable for a user of this CLI.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from qconvert.formats import FORMATS  # noqa: E402

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' → 5e9, '500MiB' → 500·2²⁰, '1000' → 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").upper().removesuffix("B")
    return int(float(m.group(1)) * _UNITS[unit])


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()


def _errors() -> tuple[type[BaseException], ...]:
    from qconvert.convert import OutputError, PlanError, SourceError
    from qconvert.convert.safetensors_io import SafetensorsError
    from qconvert.formats import FormatError

    return (OutputError, PlanError, SourceError, SafetensorsError, FormatError, ValueError, OSError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qconvert")
def main() -> None:
    """Pre-quantize diffusion transformers to NVFP4 / MXFP8 checkpoints that plain diffusers
    loads (bit-exact with torchao), and load them back fast.

    \b
    Examples:
      qconvert flux --format nvfp4 --tiny -o out/tiny-flux-nvfp4
      qconvert flux --format mxfp8 --source ./FLUX.1-dev -o FLUX.1-dev-mxfp8
      qconvert inspect FLUX.1-dev-mxfp8
    """


def _family_command(family: str) -> click.Command:
    from qconvert.convert.recipes import RECIPES

    recipe = RECIPES[family]

    @click.command(
        name=family,
        help=f"""Convert a {recipe.title} pipeline's {recipe.transformer_class} to a quantized
        checkpoint: Linear weights become torchao tensors bit-exact with what torchao builds on
        Blackwell; every other file is copied, so `DiffusionPipeline.from_pretrained(OUT)` works.

        \b
        Examples:
          qconvert {family} --format nvfp4 --tiny -o out/tiny-{family}-nvfp4
          qconvert {family} --format mxfp8 --source ./local-pipeline -o out/{family}-mxfp8
          qconvert {family} --format nvfp4 --source {recipe.default_source} --revision main
          qconvert {family} --format nvfp4 --tiny --skip 'single_transformer_blocks.*' -o out/x
        """,
    )
    @click.option(
        "--format", "fmt", type=click.Choice(sorted(FORMATS)), required=True, help="Weight format."
    )
    @click.option(
        "--source",
        default=None,
        metavar="PATH|REPO",
        help=f"Local diffusers folder or Hub repo id [default: {recipe.default_source}].",
    )
    @click.option("--revision", default=None, help="Hub branch, tag or commit (Hub sources).")
    @click.option(
        "--tiny",
        is_flag=True,
        help="Convert the embedded tiny pipeline (real classes, seeded random "
        "weights; offline, seconds).",
    )
    @click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path),
        default=None,
        help="Output folder [default: ./<source name>-<format>].",
    )
    @click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where to quantize.",
    )
    @click.option(
        "--skip",
        "skips",
        multiple=True,
        metavar="PATTERN",
        help="Keep matching layers in bf16 (substring, glob, or re:REGEX). Repeatable.",
    )
    @click.option(
        "--transformer-only",
        is_flag=True,
        help="Write only the transformer folder (no other pipeline components).",
    )
    @click.option(
        "--max-shard-size",
        default="5GB",
        show_default=True,
        help="Largest output shard (bounds memory use: about one shard).",
    )
    @click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
    def command(
        fmt: str,
        source: str | None,
        revision: str | None,
        tiny: bool,
        output: Path | None,
        device: str,
        skips: tuple[str, ...],
        transformer_only: bool,
        max_shard_size: str,
        overwrite: bool,
        quiet: bool,
    ) -> None:
        if tiny and source:
            raise click.UsageError("--tiny and --source exclude each other")
        if tiny and revision:
            raise click.UsageError("--revision applies to Hub sources, not --tiny")
        shard = parse_size(max_shard_size)
        src = None if tiny else (source or recipe.default_source)
        if output is None:
            stem = f"tiny-{family}" if tiny else Path(str(src).rstrip("/")).name
            output = Path(f"{stem}-{fmt}")
        _quiet_libraries()
        from qconvert.convert import convert

        try:
            result = convert(
                output,
                family=family,
                fmt=fmt,
                source=src,
                revision=revision,
                skips=skips,
                transformer_only=transformer_only,
                overwrite=overwrite,
                max_shard_size=shard,
                device=device,
                progress=not quiet,
                command=shlex.join(["qconvert", *sys.argv[1:]]),
            )
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; nothing was written") from None
        except _errors() as e:
            raise click.ClickException(str(e)) from None
        s = result.plan.summary()
        click.echo(
            f"wrote {result.output} ({fmt}): {s['quantized_layers']}/{s['linear_layers']} Linear "
            f"layers quantized ({float(s['quantized_share']):.1%} of params), transformer "
            f"{_gib(int(s['bf16_bytes']))} bf16 → {_gib(int(s['output_bytes']))} "
            f"({float(s['size_ratio']):.2f}×) in {result.seconds:.1f} s"
        )
        sub = (
            ""
            if (transformer_only or (result.output / "config.json").exists())
            else ', subfolder="transformer"'
        )
        click.echo("load it with:")
        if sub:
            click.echo(
                f"  from diffusers import DiffusionPipeline; "
                f"pipe = DiffusionPipeline.from_pretrained({str(result.output)!r})"
            )
        click.echo(
            f"  from qconvert.loaders import load_transformer; "
            f"t = load_transformer({str(result.output)!r})"
        )

    return command


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every file's sha256 against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(path: Path, verify: bool, as_json: bool) -> None:
    """Show a qconvert output: per-layer table, sizes, versions, bytes saved vs bf16.

    \b
    Example:
      qconvert inspect out/tiny-flux-nvfp4 --verify
    """
    from qconvert.inspect import render, verify_files

    try:
        text, manifest = render(path)
        if verify:
            verify_files(path, manifest)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        import json

        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    click.echo(text)
    if verify:
        click.echo(f"verified {len(manifest['files'])} files against the manifest")


def _register() -> None:
    from qconvert.convert.recipes import RECIPES

    for family in RECIPES:
        main.add_command(_family_command(family))


_register()

if __name__ == "__main__":
    main()
