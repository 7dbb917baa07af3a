"""``qconvert build``: CI artifact builds from one spec file (qconvert.build)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qconvert.cli.common import device_option, quiet_libraries


@click.command(name="build")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--list", "list_only", is_flag=True, help="Print the expanded targets; build none.")
@click.option(
    "--only", multiple=True, metavar="NAME", help="Build (or list) only this target. Repeatable."
)
@click.option("--push", is_flag=True, help="Publish each target to its Hub repo (HF_TOKEN).")
@click.option("--keep-going", is_flag=True, help="Build the other targets after a failure.")
@click.option(
    "--dry-run", is_flag=True, help="Say what is up to date and plan the rest (headers only)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(path_type=Path),
    default=Path("qconvert-build"),
    show_default=True,
    help="Where targets are converted (<dir>/<target>/output), kept for resuming.",
)
@device_option("Where to quantize.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def build_command(
    spec_path: Path,
    list_only: bool,
    only: tuple[str, ...],
    push: bool,
    keep_going: bool,
    dry_run: bool,
    as_json: bool,
    output_dir: Path,
    device: str,
    quiet: bool,
) -> None:
    """Build the artifacts a spec file (TOML) names: every source × format, each converted,
    verified, measured where the spec asks and a GPU is there, carded and (--push) published.
    A target whose Hub repo already records the same build fingerprint (source commit and
    hashes, recipe, format, qconvert and torchao versions) is up to date: only its qconvert.json
    is downloaded. Interrupted builds resume. Exit codes: 0 all built or up to date, 1 a target
    failed, 2 the spec is bad, 130 interrupted.

    \b
    Examples:
      qconvert build build.toml --list
      qconvert build build.toml --list --json          # matrix for GitHub Actions (fromJSON)
      qconvert build build.toml --only FLUX.1-dev-nvfp4 --push
      qconvert build build.toml --dry-run --push       # what would be rebuilt, nothing written
      qconvert build build.toml --push --keep-going --json
    """
    from qconvert.build import (
        EXIT_SPEC,
        Options,
        SpecError,
        listing,
        load_spec,
        render_listing,
        run_build,
    )

    try:
        spec = load_spec(spec_path)
        targets = spec.select(only)
    except SpecError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_SPEC)
    if list_only:
        text = json.dumps(listing(spec, targets), indent=2) if as_json else render_listing(targets)
        click.echo(text)
        return
    quiet_libraries()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    options = Options(
        output_dir=output_dir,
        push=push,
        keep_going=keep_going,
        dry_run=dry_run,
        device=device,
        progress=not quiet,
        report=lambda line: click.echo(line, err=True),
    )
    summary = run_build(spec, targets, options)
    summary.write_step_summary()
    click.echo(summary.to_json() if as_json else summary.text())
    sys.exit(summary.exit_code)


def commands() -> list[click.Command]:
    return [build_command]
