"""Publish a qconvert output to the Hugging Face Hub in one commit.

``push`` refuses a folder that is not a qconvert output or whose files no longer match the sha256
its manifest records (naming the file), renders the card for the target repo id, then uses
huggingface_hub as anyone would: ``create_repo(exist_ok=True)`` and one ``create_commit`` of
every file. Unchanged files are skipped by the client (the Hub reports their oids), so pushing
the same folder again makes no commit. The commit is atomic: a failed upload leaves the repo as
it was, and re-running sends only what the Hub does not have yet (LFS objects and Xet chunks
already stored are skipped). ``create_commit`` is used rather than ``upload_folder``, which with
Xet may split a large folder into several commits.

The token comes from ``token``, else ``HF_TOKEN``, else the stored login (huggingface_hub's own
order, ``get_token``). It is never printed, logged, or written to the card or manifest; error
messages are scrubbed of it.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qconvert import manifest as mf
from qconvert import quiet
from qconvert.cards import CARD, EXTRA_FILES, CardError, default_repo_name, write_card
from qconvert.contain import ContainmentError, inside
from qconvert.errors import QconvertError

log = logging.getLogger("qconvert")
LOGIN_HINT = "run `hf auth login` with a write token, set HF_TOKEN, or pass --token"
# Remote files a push may delete when the new output no longer has them (stale shards of an
# earlier push): model files only; anything else a user added to the repo is left alone.
_OWNED_SUFFIXES = (".safetensors", ".safetensors.index.json")
_OWNED_ROOT_FILES = ("model_index.json", "config.json", *EXTRA_FILES)


class PushError(QconvertError):
    """A push that cannot be done or did not complete; the message says what to do."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str  # the repo's page
    commit: str  # the commit the target ref points at now (the new one, or the unchanged head)
    commit_url: str
    changed: bool  # False: every file was already there, no commit was made
    revision: str  # where the files are: the branch ("main" by default) or the PR's ref
    pr_url: str | None = None  # with create_pr, the pull request opened


@dataclass(frozen=True)
class Account:
    """Who the token belongs to (whoami), resolved before anything is uploaded."""

    user: str
    orgs: tuple[str, ...]
    token: str  # the one given, else HF_TOKEN, else the stored login (huggingface_hub's order)


def _hub() -> tuple[Any, Any]:
    import huggingface_hub
    from huggingface_hub import errors

    return huggingface_hub, errors


def network_errors() -> tuple[type[BaseException], ...]:
    _, errors = _hub()
    found: list[type[BaseException]] = [errors.HfHubHTTPError, OSError, TimeoutError]
    for name in ("httpx2", "httpx", "requests"):  # the HTTP client huggingface_hub runs on
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        base = getattr(module, "HTTPError", None) or getattr(module, "RequestException", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            found.append(base)
    return tuple(found)


def _status(error: BaseException | None) -> int | None:
    """The HTTP status of an error or of the first error in its cause chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        error = error.__cause__ or error.__context__
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_BEARER = re.compile(r"(Bearer\s+)[^\s'\"]+", re.IGNORECASE)
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # what an HTTP header value may hold, no spaces


def _scrub(text: str, token: str | None) -> str:
    """``text`` without the token in any form it may take in a message: as is, stripped, as a
    Python str or bytes repr (httpx: "Illegal header value b'Bearer hf_…\\n'"), and anything
    after "Bearer"."""
    if token:
        forms = {token, token.strip(), repr(token)[1:-1], repr(token.encode())[2:-1]}
        for form in sorted((f for f in forms if len(f) >= 4), key=len, reverse=True):
            text = text.replace(form, "hf_***")
    return _BEARER.sub(r"\1***", text)


def clean_token(token: str | None, where: str = "--token") -> str | None:
    """A token as given (``--token``, a file read as is), stripped of surrounding whitespace
    and checked before use: PushError when it holds spaces or control characters."""
    if token is None:
        return None
    stripped = token.strip()
    if not stripped:
        return None
    if not _TOKEN_CHARS.fullmatch(stripped):
        raise PushError(
            f"the Hub token ({where}) holds spaces, control or non-ASCII characters; it is not a "
            f"token: copy it again from your Hub settings ({LOGIN_HINT})"
        )
    return stripped


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def validate_repo_id(repo_id: str, bare_ok: bool = False) -> None:
    """Raise PushError unless ``repo_id`` is NAMESPACE/NAME within the Hub's naming rules
    (with ``bare_ok``, a NAME alone is checked as if under a namespace)."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    problem = None
    full = f"namespace/{repo_id}" if bare_ok and "/" not in repo_id else repo_id
    if full.count("/") != 1:
        problem = "it needs exactly one '/' between namespace and name"
    else:
        try:
            hub_validate(full)
        except HFValidationError as e:
            problem = _first_line(e).rstrip(".")
    if problem is None and any(not part for part in full.split("/")):
        problem = "namespace and name must not be empty"
    if problem:
        raise PushError(
            f"repo id {repo_id!r} is malformed ({problem}); use NAMESPACE/NAME with letters, "
            f"digits, '-', '_' and '.', e.g. alice/FLUX.1-dev-nvfp4"
        )


def login(token: str | None = None) -> Account:
    """Check there is a token and that the Hub accepts it for writing; who it belongs to."""
    huggingface_hub, errors = _hub()
    token = clean_token(token)
    if not token:  # huggingface_hub's order: HF_TOKEN, then the stored login
        token = clean_token(huggingface_hub.get_token(), "HF_TOKEN or the stored login")
    if not token:
        raise PushError(f"not logged in to the Hugging Face Hub: {LOGIN_HINT}")
    from huggingface_hub import constants  # a lazy submodule: import it, never getattr it

    endpoint = constants.ENDPOINT
    try:
        who = huggingface_hub.HfApi().whoami(token=token)
    except errors.HfHubHTTPError as e:
        if _status(e) == 401:
            raise PushError(
                f"the Hub ({endpoint}) rejected the token (401 Unauthorized): it is wrong, "
                f"expired or revoked; {LOGIN_HINT}"
            ) from None
        raise PushError(
            f"could not check the token with {endpoint} ({_scrub(_first_line(e), token)}); "
            f"check the network and re-run"
        ) from None
    except network_errors() as e:
        raise PushError(
            f"could not reach {endpoint} ({_scrub(_first_line(e), token)}); check the network "
            f"and re-run"
        ) from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(f"the token is read-only; {LOGIN_HINT}")
    orgs = tuple(str(o.get("name")) for o in who.get("orgs") or [] if isinstance(o, dict))
    return Account(str(who["name"]), orgs, token)


def target_repo(account: Account, repo_id: str | None, default_name: str) -> str:
    """The repo id to push to: ``repo_id`` (a bare name goes under the user) or the default."""
    if repo_id is None:
        repo_id = f"{account.user}/{default_name}"
    elif "/" not in repo_id:
        repo_id = f"{account.user}/{repo_id}"
    validate_repo_id(repo_id)
    return repo_id


def check_namespace(account: Account, repo_id: str) -> None:
    """Refuse early (before a long conversion) a namespace the token's user cannot write to."""
    namespace = repo_id.split("/", 1)[0]
    if namespace != account.user and namespace not in account.orgs:
        raise PushError(
            f"{repo_id}: {account.user} cannot write to the namespace {namespace!r} (it belongs "
            f"to someone else); push to {account.user}/{repo_id.split('/', 1)[1]} instead"
        )


def check_output(root: Path) -> dict[str, Any]:
    """The manifest of a qconvert output whose files all match it; PushError naming the first
    file that is missing, changed, or not part of the output."""

    if not root.is_dir():
        raise PushError(f"{root}: no such directory")
    try:
        manifest = mf.load(root)
    except FileNotFoundError:
        raise PushError(
            f"{root}: not a qconvert output (no {mf.MANIFEST}); convert first, e.g. "
            f"`qconvert flux --format nvfp4 -o {root}`"
        ) from None
    except (OSError, ValueError) as e:
        raise PushError(f"{root / mf.MANIFEST}: unreadable ({e}); re-convert") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != "qconvert":
        raise PushError(f"{root / mf.MANIFEST}: not a qconvert manifest; re-convert")
    try:
        mf.verify(root, manifest)
    except ValueError as e:
        raise PushError(f"{e}; refusing to push: re-convert, or restore the file") from None
    except (KeyError, TypeError) as e:
        raise PushError(f"{root / mf.MANIFEST}: malformed files table ({e!r})") from None
    for name in EXTRA_FILES:  # the card and the measurements: ours, never links out
        try:
            inside(root, name, f"{root}:")
        except ContainmentError as e:
            raise PushError(f"{e}; refusing to push") from None
    listed = {str(row["path"]) for row in manifest["files"]} | set(EXTRA_FILES)
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith((".cache/huggingface/", ".git/")):
            continue  # what huggingface_hub itself never uploads
        if rel not in listed:
            raise PushError(
                f"{path}: not part of this qconvert output (not in {mf.MANIFEST}); refusing to "
                f"push: remove it, or re-convert"
            )
    return manifest


def _owned(path: str, top_dirs: set[str]) -> bool:
    if path.endswith(_OWNED_SUFFIXES) or path in _OWNED_ROOT_FILES:
        return True
    return "/" in path and path.split("/", 1)[0] in top_dirs


def _commit_message(manifest: dict[str, Any]) -> str:
    from qconvert.cards import base_of, formats_of

    base = base_of(manifest)
    what = base.repo_id or base.name
    version = manifest.get("versions", {}).get("qconvert", "")
    return f"{what} as {' + '.join(f.upper() for f in formats_of(manifest))} (qconvert {version})"


def push(
    output_dir: str | Path,
    repo_id: str | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    account: Account | None = None,
) -> PushResult:
    """Publish a qconvert output folder to the Hub in one commit; see the module docstring.

    ``repo_id`` defaults to ``<user>/<base model>-<format>``; a bare name goes under the user.
    ``revision`` is the branch to push to (created from main when missing). ``create_pr`` opens
    a pull request instead of committing to the branch. ``account`` skips the whoami check when
    the caller already made it (``login``).
    """
    root = Path(output_dir)
    manifest = check_output(root)
    if repo_id is not None and "/" in repo_id:
        validate_repo_id(repo_id)  # before any network call
    account = account or login(token)
    token = account.token
    repo_id = target_repo(account, repo_id, default_repo_name(manifest))
    try:
        write_card(root, repo_id)  # the card names the repo it is published under
    except CardError as e:
        raise PushError(str(e)) from None
    except OSError as e:
        raise PushError(f"{root / CARD}: cannot write the card ({e})") from None
    branch = revision or "main"
    try:
        return _upload(root, manifest, repo_id, branch, private, create_pr, commit_message, token)
    except PushError:
        raise
    except Exception as e:
        raise _explain(e, repo_id, account, token) from None


def _upload(
    root: Path,
    manifest: dict[str, Any],
    repo_id: str,
    branch: str,
    private: bool,
    create_pr: bool,
    commit_message: str | None,
    token: str | None,
) -> PushResult:
    huggingface_hub, errors = _hub()
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api = huggingface_hub.HfApi()
    url = str(api.create_repo(repo_id, token=token, private=private, exist_ok=True))
    if private and not api.repo_info(repo_id, token=token).private:
        raise PushError(
            f"{repo_id} already exists and is public; --private does not change an existing "
            f"repo: make it private on the Hub first, or push to a new repo id"
        )
    if branch != "main" and not branch.startswith("refs/"):
        api.create_branch(repo_id, branch=branch, token=token, exist_ok=True)
    try:
        head = api.repo_info(repo_id, revision=branch, token=token).sha
    except errors.RevisionNotFoundError:
        raise PushError(f"{repo_id}: revision {branch!r} not found; push to a branch") from None
    local = [str(row["path"]) for row in manifest["files"]]
    local += [name for name in EXTRA_FILES if (root / name).is_file()]
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(root / rel)) for rel in local
    ]
    top_dirs = {rel.split("/", 1)[0] for rel in local if "/" in rel}
    remote = api.list_repo_files(repo_id, revision=head, token=token)
    stale = sorted(set(remote) - set(local) - {".gitattributes"})
    operations += [CommitOperationDelete(p) for p in stale if _owned(p, top_dirs)]
    # qconvert says "already has these files" itself; the client's own line would come first.
    with quiet.dropped("huggingface_hub.hf_api", quiet.EMPTY_COMMIT):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or _commit_message(manifest),
            commit_description="Made with qconvert; what, how and from what: qconvert.json.",
            revision=None if branch == "main" else branch,
            create_pr=create_pr,
            parent_commit=head,
            token=token,
        )
    changed = info.oid != head
    pr = changed and create_pr
    return PushResult(
        repo_id=repo_id,
        url=url,
        commit=info.oid,
        commit_url=info.commit_url,
        changed=changed,
        revision=str(info.pr_revision) if pr and info.pr_revision else branch,
        pr_url=info.pr_url if pr else None,
    )


def _explain(error: Exception, repo_id: str, account: Account, token: str | None) -> PushError:
    """One actionable line for an upload failure (never the token)."""
    _, errors = _hub()
    status = _status(error)
    detail = _scrub(_first_line(error), token)
    for e in _chain(error):
        if isinstance(e, errors.HfHubHTTPError | RuntimeError) and str(e).startswith(
            "Error while uploading"
        ):
            detail = _scrub(_first_line(e), token)
            break
    if status == 401:
        return PushError(f"{repo_id}: the Hub rejected the token (401); {LOGIN_HINT}")
    if status == 403:
        name = repo_id.split("/", 1)[1]
        return PushError(
            f"{repo_id}: {account.user} has no write access (403 Forbidden): the repo belongs to "
            f"someone else; push to {account.user}/{name} or ask its owner for access"
        )
    if status == 404:
        return PushError(
            f"{repo_id}: not found, or private to someone else (404); check the repo id"
        )
    if status == 412:
        return PushError(
            f"{repo_id}: the branch moved while pushing (412); re-run to push on top of it"
        )
    if status is not None and status < 500 and status not in (408, 429):
        return PushError(f"{repo_id}: the Hub refused the push ({detail})")
    if isinstance(error, (*network_errors(), RuntimeError)):
        return PushError(
            f"{repo_id}: upload failed after the client's retries ({detail}); nothing was "
            f"committed: re-run the same command to resume (files already uploaded are skipped)"
        )
    return PushError(f"{repo_id}: push failed ({type(error).__name__}: {detail})")


__all__ = [
    "Account",
    "PushError",
    "PushResult",
    "check_namespace",
    "check_output",
    "login",
    "push",
    "target_repo",
    "validate_repo_id",
]
