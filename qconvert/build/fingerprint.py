"""A build's fingerprint: what its output is a function of, hashed.

The inputs are the source (a Hub repo's resolved commit, which pins every file; a local
folder's file hashes, computed as the converter's manifest computes them; a tiny build's family
and seed), the recipe (the family recipe, the target's recipe file rules, skip / only patterns
and options), the format, and the qconvert and torchao versions. The digest is recorded in the
output's ``qconvert.json`` under ``"build"`` (``record``), so whether a Hub repo is up to date is
answered by downloading that one file (``published``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qconvert.build.spec import AUTO, Target

log = logging.getLogger("qconvert")
SCHEMA = 1
BUILD_KEY = "build"  # the manifest key holding the fingerprint
TINY_SEED = 0  # the seed convert() builds tiny sources with


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    inputs: dict[str, Any]

    def record(self, target: Target) -> dict[str, Any]:
        """What the manifest's "build" key holds."""
        return {"fingerprint": self.digest, "inputs": self.inputs, "target": target.name}


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def recipe_digest(target: Target) -> str:
    """Everything that decides the plan besides the source and the format."""
    from qconvert.convert.recipes import families, generic, load_user_recipe

    if target.family == AUTO:  # the source's class picks among all of them
        every = {**families(), "generic": generic()}
        recipes: Any = {k: asdict(v) for k, v in sorted(every.items())}
    else:
        recipes = asdict(families()[target.family])
    user = None
    if target.recipe is not None:
        loaded = load_user_recipe(Path(target.recipe))
        user = {"format": loaded.format, "rules": [asdict(r) for r in loaded.rules]}
    return _digest(
        {
            "family": target.family,
            "recipes": recipes,
            "recipe_file": user,
            "skip": list(target.skips),
            "only": list(target.only),
            "strict": target.strict,
            "transformer_only": target.transformer_only,
            "max_shard_size": target.max_shard_size,
        }
    )


class Sources:
    """Resolves each target's source once per run (targets of one source share it)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], dict[str, Any]] = {}

    def identity(self, target: Target) -> dict[str, Any]:
        key = (target.source_kind, target.source, target.revision, target.transformer_only)
        key += (target.family,) if target.source_kind == "tiny" else ()
        if key not in self._seen:
            self._seen[key] = _identity(target)
        return self._seen[key]


def _identity(target: Target) -> dict[str, Any]:
    if target.source_kind == "tiny":
        return {"kind": "tiny", "family": target.family, "seed": TINY_SEED}
    if target.source_kind == "hub":
        assert target.source is not None
        return {"kind": "hub", "repo_id": target.source, "commit": hub_commit(target)}
    from qconvert.convert.record import source_table
    from qconvert.convert.source import open_local

    src = open_local(Path(str(target.source)))
    only_transformer = target.transformer_only or src.transformer_only
    files = source_table(src, src.component_files(only_transformer))
    return {"kind": "local", "files": files}


def hub_commit(target: Target) -> str:
    """The commit a Hub source's revision points at now (one model_info call)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from qconvert.convert import SourceError

    repo = str(target.source)
    try:
        return str(HfApi().model_info(repo, revision=target.revision).sha)
    except RepositoryNotFoundError:
        raise SourceError(
            f"source {repo}: repo not found (or private: set HF_TOKEN or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"source {repo}: revision {target.revision!r} not found") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceError(f"source {repo}: could not resolve its revision ({e})") from None


def fingerprint(target: Target, identity: dict[str, Any]) -> Fingerprint:
    from qconvert.manifest import versions

    found = versions()
    inputs = {
        "schema": SCHEMA,
        "source": identity,
        "recipe": recipe_digest(target),
        "format": target.fmt,
        "qconvert": found["qconvert"],
        "torchao": found["torchao"],
    }
    return Fingerprint(_digest(inputs), inputs)


def recorded(manifest: dict[str, Any]) -> str | None:
    """The fingerprint a manifest records, if any."""
    build = manifest.get(BUILD_KEY)
    value = build.get("fingerprint") if isinstance(build, dict) else None
    return value if isinstance(value, str) else None


def source_differs(identity: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """Why an output's manifest was not made from the fingerprinted source, or None."""
    src = manifest.get("source", {})
    if identity["kind"] != src.get("kind"):
        return f"source kind {src.get('kind')!r}, expected {identity['kind']!r}"
    if identity["kind"] == "hub" and src.get("commit") != identity["commit"]:
        return f"source commit {src.get('commit')}, expected {identity['commit']}"
    if identity["kind"] == "local" and src.get("files") != identity["files"]:
        return "source files changed while building"
    return None


def published(repo_id: str) -> str | None:
    """The fingerprint recorded in a Hub repo's qconvert.json; None when the repo or the file
    is not there. Downloads that one file and nothing else."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from qconvert.hub import PushError
    from qconvert.manifest import MANIFEST

    try:
        path = hf_hub_download(repo_id, MANIFEST)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        return None
    except (HfHubHTTPError, OSError) as e:
        raise PushError(f"{repo_id}: could not read its {MANIFEST} ({e}); re-run") from None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("qconvert: %s/%s is not readable JSON (%s); rebuilding", repo_id, MANIFEST, e)
        return None
    return recorded(data) if isinstance(data, dict) else None
