"""``qconvert push`` and ``qconvert card``, and the --push of convert commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qconvert.cli.common import PUSH_OPTIONS, F, base_model_option, hub_options

INTERRUPTED_PUSH = "interrupted; nothing was committed: re-run to resume the upload"


def push_options(f: F) -> F:
    """--push and the Hub options of convert commands (--revision names the source's)."""
    f = hub_options(f, "--push-revision")
    return click.option(
        "--push", is_flag=True, help="Publish the output to the Hub in one commit (with a card)."
    )(f)


def _quiet_hub() -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def push_and_report(output: Path, opts: dict[str, Any], account: Any = None) -> None:
    from qconvert.hub import push

    try:
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
    except KeyboardInterrupt:
        error = click.ClickException(INTERRUPTED_PUSH)
        error.exit_code = 130
        raise error from None
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


def push_preflight(opts: dict[str, Any], quiet: bool) -> Any:
    """For --push: check the token and the repo id before a long conversion; the account."""
    if not opts["push"]:
        given = [k for k in PUSH_OPTIONS if opts[k]]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} needs --push")
        return None
    if quiet:
        _quiet_hub()
    from qconvert.hub import check_namespace, login, target_repo

    account = login(opts["token"])
    if opts["repo_id"]:
        check_namespace(account, target_repo(account, opts["repo_id"], ""))
    return account


@click.command(name="push")
@click.argument("path", type=click.Path(path_type=Path))
@lambda f: hub_options(f, "--revision")
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
        _quiet_hub()
    push_and_report(path, opts)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--repo-id",
    default=None,
    metavar="ID",
    help="Repo id the usage snippets load [default: <base model>-<format>].",
)
@base_model_option
def card(path: Path, repo_id: str | None, base_model: str | None) -> None:
    """Re-render a qconvert output's README.md (model card) from its manifest, plus quality.json
    and speed.json when present. --base-model records the base in the manifest first.

    \b
    Examples:
      qconvert card FLUX.1-dev-nvfp4 --repo-id alice/FLUX.1-dev-nvfp4
      qconvert card out/my-flux-nvfp4 --base-model black-forest-labs/FLUX.1-dev@main
    """
    from qconvert.cards import write_card
    from qconvert.hub import validate_repo_id

    if repo_id is not None:  # NAMESPACE/NAME, or a bare NAME (the default's form)
        validate_repo_id(repo_id, bare_ok=True)
    if base_model is not None:
        from qconvert.convert.base_model import set_base_model

        set_base_model(path, base_model)
    click.echo(f"wrote {write_card(path, repo_id)}")


def commands() -> list[click.Command]:
    return [push_command, card]
