"""What every command shares: the error handler, ParamTypes, option groups, quiet libraries."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qconvert.errors import QconvertError

F = Callable[..., Any]


_ARGV = "qconvert.argv"


class Group(click.Group):
    """The one place user errors become one line: a QconvertError prints its message and exits
    with its exit_code (1; 130 for an interrupted conversion); Ctrl-C anywhere else exits 130
    too; anything else is a bug and keeps its traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:  # the arguments as given: what command_line() records
            ctx.meta[_ARGV] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QconvertError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None


class FormatType(click.Choice):
    """--format: a format name, checked against ``qconvert.formats.FORMATS``; gives the
    Format object, resolved once here."""

    def __init__(self) -> None:
        from qconvert.formats import FORMATS

        super().__init__(sorted(FORMATS))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from qconvert.formats import FORMATS, Format

        if isinstance(value, Format):
            return value
        return FORMATS[super().convert(value, param, ctx)]


class SizeType(click.ParamType):
    """--max-shard-size: 5GB, 500MiB, 1000 (bytes)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from qconvert.sizes import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except QconvertError as e:
            self.fail(str(e), param, ctx)


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()


def device_option(help: str) -> Callable[[F], F]:
    """``--device auto|cpu|cuda`` (auto: CUDA when there is one), with the command's ``help``."""
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help=help,
    )


def stack(options: list[F], f: F) -> F:
    """Apply Click option decorators so they show in --help in list order."""
    for option in reversed(options):
        f = option(f)
    return f


def selection_options(f: F) -> F:
    """--skip / --only / --recipe / --strict: shared by convert and plan commands."""
    options = [
        click.option(
            "--skip",
            "skips",
            multiple=True,
            metavar="PATTERN",
            help="Keep matching layers in bf16. PATTERN: a substring, exact:NAME (the whole "
            "module name), a glob over the whole name, or re:REGEX. Repeatable.",
        ),
        click.option(
            "--only",
            multiple=True,
            metavar="PATTERN",
            help="Quantize only matching layers (same PATTERN forms; the recipe's other rules "
            "still apply). Repeatable.",
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
    return stack(options, f)


base_model_option = click.option(
    "--base-model",
    default=None,
    metavar="REPO[@REVISION]",
    help="The Hub model the source is, for the card (base_model, license link) and the default "
    "repo name; sets or overrides what the folder shows (a Hub cache path, `hf download "
    "--local-dir` metadata).",
)


PUSH_OPTIONS = ("repo_id", "private", "push_revision", "create_pr", "commit_message", "token")


def hub_options(f: F, revision: str) -> F:
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
    return stack(options, f)


def command_line() -> str:
    """The command as typed, for the manifest and the card, with any --token value hidden:
    the arguments the qconvert group was given (``sys.argv`` outside a click command)."""
    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(_ARGV) if ctx is not None else None
    args, hide = [], False
    for arg in sys.argv[1:] if given is None else given:
        if hide:
            arg, hide = "***", False
        elif arg == "--token":
            hide = True
        elif arg.startswith("--token="):
            arg = "--token=***"
        args.append(arg)
    return shlex.join(["qconvert", *args])
