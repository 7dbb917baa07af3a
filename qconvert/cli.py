"""The ``qconvert`` command line: a thin Click layer over ``qconvert.convert`` and friends."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Before torchao is imported: its loader logs a warning per unbuilt CUDA extension, and torch
# warns about enum registration; neither is actionable for a user of this CLI.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from qconvert.formats import FORMATS  # noqa: E402
from qconvert.sizes import human_size  # noqa: E402

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
    from qconvert.cards import CardError
    from qconvert.convert import Interrupted, OutputError, PlanError, RecipeError, SourceError
    from qconvert.convert.push import PushError
    from qconvert.convert.safetensors_io import SafetensorsError
    from qconvert.formats import FormatError

    return (
        Interrupted,
        PushError,
        CardError,
        OutputError,
        PlanError,
        RecipeError,
        SourceError,
        SafetensorsError,
        FormatError,
        ValueError,
        OSError,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qconvert")
def main() -> None:
    """Pre-quantize diffusion transformers to NVFP4 / MXFP8 checkpoints that plain diffusers
    loads (bit-exact with torchao), and load them back fast.

    \b
    Examples:
      qconvert flux --format nvfp4 --tiny -o out/tiny-flux-nvfp4
      qconvert qwenimage --format mxfp8 --source ./Qwen-Image -o Qwen-Image-mxfp8
      qconvert model ./some-dit-pipeline --format nvfp4      # any diffusers transformer
      qconvert plan ltx2 --format nvfp4 --real-config        # what would be quantized, no weights
      qconvert inspect Qwen-Image-mxfp8 --verify
    """


def _stack(options: list[Callable[..., Any]], f: Callable[..., None]) -> Callable[..., None]:
    """Apply Click option decorators so they show in --help in list order."""
    for option in reversed(options):
        f = option(f)
    return f


def _selection_options(f: Callable[..., None]) -> Callable[..., None]:
    """--skip / --only / --recipe / --strict: shared by convert and plan commands."""
    options = [
        click.option(
            "--skip",
            "skips",
            multiple=True,
            metavar="PATTERN",
            help="Keep matching layers in bf16 (substring, glob, or re:REGEX). Repeatable.",
        ),
        click.option(
            "--only",
            multiple=True,
            metavar="PATTERN",
            help="Quantize only matching layers (the recipe's other rules still apply). "
            "Repeatable.",
        ),
        click.option(
            "--recipe",
            "recipe_file",
            type=click.Path(path_type=Path),
            default=None,
            help="TOML recipe file mapping patterns to formats or to keep (see README).",
        ),
        click.option("--strict", is_flag=True, help="Fail when a pattern matches no Linear layer."),
    ]
    return _stack(options, f)


def _convert_options(f: Callable[..., None]) -> Callable[..., None]:
    """Options every convert command takes."""
    options = [
        click.option(
            "--format",
            "fmt",
            type=click.Choice(sorted(FORMATS)),
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
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help="Where to quantize.",
        ),
        _selection_options,
        click.option(
            "--transformer-only",
            is_flag=True,
            help="Write only the transformer folder (no other pipeline components).",
        ),
        click.option(
            "--max-shard-size",
            default="5GB",
            show_default=True,
            help="Largest output shard (bounds memory use: about one shard).",
        ),
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue an interrupted run: reuse its finished shards (hash-checked).",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
        _push_options,
    ]
    return _stack(options, f)


_PUSH_OPTIONS = ("repo_id", "private", "push_revision", "create_pr", "commit_message", "token")


def _hub_options(f: Callable[..., None], revision: str) -> Callable[..., None]:
    """--repo-id / --private / <revision> / --create-pr / --commit-message / --token."""
    options = [
        click.option(
            "--repo-id",
            default=None,
            metavar="ID",
            help="Hub repo [default: <your user>/<base model>-<format>].",
        ),
        click.option("--private", is_flag=True, help="Create the repo private."),
        click.option(
            revision,
            "push_revision",
            default=None,
            metavar="BRANCH",
            help="Branch to push to (created when missing) [default: main].",
        ),
        click.option("--create-pr", is_flag=True, help="Open a pull request instead."),
        click.option("--commit-message", default=None, metavar="MSG", help="Commit title."),
        click.option(
            "--token",
            default=None,
            metavar="TOKEN",
            help="Hub token [default: HF_TOKEN, else the `hf auth login` one]. Never shown.",
        ),
    ]
    return _stack(options, f)


def _push_options(f: Callable[..., None]) -> Callable[..., None]:
    """--push and the Hub options of convert commands (--revision names the source's)."""
    f = _hub_options(f, "--push-revision")
    return click.option(
        "--push", is_flag=True, help="Publish the output to the Hub in one commit (with a card)."
    )(f)


def _command_line() -> str:
    """The command as typed, for the manifest and the card, with any --token value hidden."""
    args, hide = [], False
    for arg in sys.argv[1:]:
        if hide:
            arg, hide = "***", False
        elif arg == "--token":
            hide = True
        elif arg.startswith("--token="):
            arg = "--token=***"
        args.append(arg)
    return shlex.join(["qconvert", *args])


def _push_and_report(output: Path, opts: dict[str, Any], account: Any = None) -> None:
    from qconvert.convert.push import push

    result = push(
        output,
        opts["repo_id"],
        private=opts["private"],
        revision=opts["push_revision"],
        create_pr=opts["create_pr"],
        commit_message=opts["commit_message"],
        token=opts["token"],
        account=account,
    )
    where = f"{result.url} (revision {result.revision}, commit {result.commit})"
    if not result.changed:
        click.echo(f"{where}: already has these files; nothing to push")
    elif result.pr_url:
        click.echo(f"opened {result.pr_url} on {result.url} (commit {result.commit})")
    else:
        click.echo(f"pushed {output} to {where}")
    args = repr(result.repo_id)
    if result.revision != "main":
        args += f", revision={result.revision!r}"
    if (output / "config.json").exists():
        click.echo(f"load it with: load_transformer({args}) (qconvert.loaders)")
    else:
        click.echo(f"load it with: DiffusionPipeline.from_pretrained({args})")


_INTERRUPTED_PUSH = "interrupted; nothing was committed: re-run to resume the upload"


def _push_preflight(opts: dict[str, Any], quiet: bool) -> Any:
    """For --push: check the token and the repo id before a long conversion; the account."""
    if not opts["push"]:
        given = [k for k in _PUSH_OPTIONS if opts[k]]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} needs --push")
        return None
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    from qconvert.convert.push import check_namespace, login, target_repo

    try:
        account = login(opts["token"])
        if opts["repo_id"]:
            check_namespace(account, target_repo(account, opts["repo_id"], ""))
    except _errors() as e:
        raise click.ClickException(str(e)) from None
    return account


def _run_convert(family: str, source: str | None, stem: str, opts: dict[str, Any]) -> None:
    output = opts.pop("output") or Path(f"{stem}-{opts['fmt']}")
    shard = parse_size(opts.pop("max_shard_size"))
    quiet = opts.pop("quiet")
    hub = {key: opts.pop(key) for key in ("push", *_PUSH_OPTIONS)}
    _quiet_libraries()
    from qconvert.convert import convert

    account = _push_preflight(hub, quiet)
    try:
        result = convert(
            output,
            family=family,
            source=source,
            max_shard_size=shard,
            progress=not quiet,
            command=_command_line(),
            **opts,
        )
    except _errors() as e:
        raise click.ClickException(str(e)) from None
    s = result.plan.summary()
    recipe = result.plan.recipe
    click.echo(
        f"wrote {result.output} ({', '.join(result.plan.formats)}; recipe {recipe.name}): "
        f"{s['quantized_layers']}/{s['linear_layers']} Linear layers quantized "
        f"({float(s['quantized_share']):.1%} of params), transformer "
        f"{human_size(int(s['bf16_bytes']))} bf16 → {human_size(int(s['output_bytes']))} "
        f"({float(s['size_ratio']):.2f}×) in {result.seconds:.1f} s"
    )
    out = str(result.output)
    click.echo("load it with:")
    if not (result.output / "config.json").exists():
        click.echo(
            f"  from diffusers import DiffusionPipeline; "
            f"pipe = DiffusionPipeline.from_pretrained({out!r})"
        )
        click.echo(f"  from qconvert.loaders import load_pipeline; pipe = load_pipeline({out!r})")
    else:
        click.echo(
            f"  from qconvert.loaders import load_transformer; t = load_transformer({out!r})"
        )
    if account is not None:
        try:
            _push_and_report(result.output, hub, account)
        except KeyboardInterrupt:
            raise click.ClickException(_INTERRUPTED_PUSH) from None
        except _errors() as e:
            raise click.ClickException(f"{e} (the output is in {result.output})") from None


def _family_command(family: str) -> click.Command:
    from qconvert.convert.recipes import families

    recipe = families()[family]

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
    @_convert_options
    def command(source: str | None, tiny: bool, **opts: Any) -> None:
        if tiny and source:
            raise click.UsageError("--tiny and --source exclude each other")
        if tiny and opts["revision"]:
            raise click.UsageError("--revision applies to Hub sources, not --tiny")
        src = None if tiny else (source or recipe.default_source)
        stem = f"tiny-{family}" if tiny else Path(str(src).rstrip("/")).name
        _run_convert(family, src, stem, opts)

    return command


@main.command()
@click.argument("source", metavar="SOURCE")
@_convert_options
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


@main.command()
@click.argument("target", metavar="FAMILY|SOURCE")
@click.option(
    "--format", "fmt", type=click.Choice(sorted(FORMATS)), required=True, help="Weight format."
)
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
@_selection_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(
    target: str,
    fmt: str,
    source: str | None,
    revision: str | None,
    tiny: bool,
    real_config: bool,
    as_json: bool,
    **selection: Any,
) -> None:
    """Show what a conversion would do, reading only safetensors headers: per-layer decision
    and reason, the parameter share quantized and the estimated size vs bf16. Seconds.

    \b
    Examples:
      qconvert plan flux --format nvfp4 --tiny
      qconvert plan qwenimage --format nvfp4 --real-config --json
      qconvert plan ./my-dit-pipeline --format mxfp8 --skip 'blocks.0.'
    """
    _quiet_libraries()
    from qconvert.convert import families
    from qconvert.inspect import render_plan

    known = families()
    if target not in known and (source or tiny or real_config):
        raise click.UsageError("--source, --tiny and --real-config need a family name")
    if sum(map(bool, (source, tiny, real_config))) > 1:
        raise click.UsageError("--source, --tiny and --real-config exclude each other")
    try:
        result = _make_plan(target, fmt, source, revision, tiny, real_config, selection)
    except _errors() as e:
        raise click.ClickException(str(e)) from None
    click.echo(render_plan(result, as_json))


def _make_plan(
    target: str,
    fmt: str,
    source: str | None,
    revision: str | None,
    tiny: bool,
    real_config: bool,
    selection: dict[str, Any],
) -> Any:
    from qconvert.convert import families, plan_for, selection_for
    from qconvert.convert.converter import open_source
    from qconvert.convert.plan import real_config_source
    from qconvert.convert.source import looks_like_repo_id, remote_headers

    chosen = selection_for(selection["skips"], selection["only"], selection["recipe_file"])
    strict = selection["strict"]
    known = families()
    family = target if target in known else "auto"
    recipe = known.get(target)
    if real_config and recipe:
        return plan_for(real_config_source(recipe), family, fmt, chosen, strict)
    if tiny and recipe:
        with open_source(None, recipe, None, False) as src:
            return plan_for(src, family, fmt, chosen, strict)
    where = source or (recipe.default_source if recipe else target)
    if looks_like_repo_id(where):
        return plan_for(remote_headers(where, revision), family, fmt, chosen, strict)
    if family == "auto" and not Path(where).exists():
        raise click.UsageError(
            f"{target!r} is neither a family ({', '.join(known)}) nor an existing path or repo id"
        )
    with open_source(where, recipe, revision, False) as src:
        return plan_for(src, family, fmt, chosen, strict)


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


def _push_command_options(f: Callable[..., None]) -> Callable[..., None]:
    return _hub_options(f, "--revision")


@main.command(name="push")
@click.argument("path", type=click.Path(path_type=Path))
@_push_command_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def push_command(path: Path, quiet: bool, **opts: Any) -> None:
    """Publish a qconvert output to the Hugging Face Hub: checks every file against the
    manifest, writes the card for the repo, then creates the repo (if needed) and uploads the
    folder in one commit. Unchanged files are not sent again; nothing changed, no commit.

    \b
    Examples:
      qconvert push FLUX.1-dev-nvfp4                      # -> <you>/FLUX.1-dev-nvfp4
      qconvert push out/x --repo-id my-org/x --private
      qconvert push out/x --repo-id me/x --create-pr --commit-message "re-convert"
    """
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        _push_and_report(path, opts)
    except KeyboardInterrupt:
        raise click.ClickException(_INTERRUPTED_PUSH) from None
    except _errors() as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--repo-id",
    default=None,
    metavar="ID",
    help="Repo id the usage snippets load [default: <base model>-<format>].",
)
def card(path: Path, repo_id: str | None) -> None:
    """Re-render a qconvert output's README.md (model card) from its manifest, plus quality.json
    and speed.json when present.

    \b
    Example:
      qconvert card FLUX.1-dev-nvfp4 --repo-id alice/FLUX.1-dev-nvfp4
    """
    from qconvert.cards import write_card

    try:
        written = write_card(path, repo_id)
    except _errors() as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {written}")


def _register() -> None:
    from qconvert.convert.recipes import families

    for family in families():
        main.add_command(_family_command(family))


_register()

if __name__ == "__main__":
    main()
