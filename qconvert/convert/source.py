"""Where the bf16 weights come from: a local diffusers folder, a Hub repo, or a tiny build."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qconvert.convert.safetensors_io import Header, read_header
from qconvert.errors import QconvertError
from qconvert.locate import looks_like_repo_id as looks_like_repo_id  # (moved; re-exported)

WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class SourceError(QconvertError, ValueError):
    """A source that cannot be converted; the message says what is wrong and what to do."""


@dataclass
class Source:
    """A diffusers pipeline (or lone transformer) folder on local disk, ready to read."""

    root: Path  # pipeline folder (or the transformer folder when ``transformer_only``)
    transformer_dir: Path
    config: dict[str, object]
    shards: list[Header]
    description: dict[str, object]  # what the manifest records about where this came from
    transformer_only: bool = False
    model_index: dict[str, object] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return str(self.config.get("_class_name", ""))

    def component_dirs(self) -> list[str]:
        """The pipeline's component folders other than the transformer, from model_index."""
        names = []
        for key, value in sorted(self.model_index.items()):
            if key.startswith("_") or key == "transformer":
                continue
            if isinstance(value, list) and len(value) == 2 and value[0] is not None:
                if (self.root / key).is_dir():
                    names.append(key)
        return names


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _transformer_shards(folder: Path) -> list[Header]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{index}: no weight_map; the checkpoint index is corrupt")
        files = sorted(set(map(str, weight_map.values())))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise SourceError(
                f"{folder}: shard {missing[0]} listed in {WEIGHTS_INDEX} is missing; "
                f"the download is incomplete"
            )
        paths = [folder / f for f in files]
    elif (folder / WEIGHTS_FILE).is_file():
        paths = [folder / WEIGHTS_FILE]
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if not found:
            raise SourceError(
                f"{folder}: no safetensors weights (expected {WEIGHTS_FILE} or {WEIGHTS_INDEX}); "
                f".bin checkpoints are not read (no pickle) — convert them to safetensors first"
            )
        paths = [folder / f for f in found]
    return [read_header(p) for p in paths]


def open_local(path: Path, description: dict[str, object] | None = None) -> Source:
    """A local pipeline folder (model_index.json + transformer/) or a transformer folder."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory; give a diffusers pipeline folder")
    if description is None:
        description = {"kind": "local", "path": str(path.resolve())}
        if (path / "README.md").is_file():
            description["card"] = base_card_metadata(path / "README.md")
    if (path / "model_index.json").is_file():
        model_index = _read_json(path / "model_index.json")
        tdir = path / "transformer"
        if "transformer" not in model_index or not (tdir / "config.json").is_file():
            raise SourceError(
                f"{path}: this pipeline has no transformer/ component (config.json); "
                f"qconvert converts diffusion-transformer pipelines"
            )
        config = _read_json(tdir / "config.json")
        return Source(
            path, tdir, config, _transformer_shards(tdir), description, False, model_index
        )
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "_class_name" in config and "_diffusers_version" in config:
            return Source(path, path, config, _transformer_shards(path), description, True)
    raise SourceError(
        f"{path}: not a diffusers pipeline (no model_index.json) or transformer folder "
        f"(no diffusers config.json)"
    )


def base_card_metadata(readme: Path, gated: object = None) -> dict[str, object]:
    """The base model's license metadata (from its README.md front matter) and Hub gating, for
    the manifest and the card; {} when there is none."""
    import logging

    import yaml
    from huggingface_hub.repocard import metadata_load

    out: dict[str, object] = {}
    try:
        data = metadata_load(readme) if readme.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        logging.getLogger("qconvert").warning(
            "qconvert: %s: unreadable card metadata (%s); the license is unknown", readme, e
        )
        data = None
    if not isinstance(data, dict):
        data = None
    for key in ("license", "license_name", "license_link"):
        value = (data or {}).get(key)
        if isinstance(value, str | list) and value:
            out[key] = value
    if gated:
        out["gated"] = str(gated)
    return out


def download(
    repo_id: str, revision: str | None, transformer_only: bool, cache_dir: Path | None
) -> Source:
    """Fetch only the files a conversion needs from the Hub and open them."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        if "model_index.json" in files:
            index_path = api.hf_hub_download(
                repo_id, "model_index.json", revision=info.sha, cache_dir=cache_dir
            )
            model_index = _read_json(Path(index_path))
            folders = (
                ["transformer"]
                if transformer_only
                else [
                    k
                    for k, v in model_index.items()
                    if not k.startswith("_") and isinstance(v, list) and v[0] is not None
                ]
            )
            patterns = ["model_index.json", "LICENSE*", "README.md"] + [f"{d}/*" for d in folders]
        else:
            patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
            patterns += ["LICENSE*", "README.md"]
        local = snapshot_download(
            repo_id, revision=info.sha, allow_patterns=patterns, cache_dir=cache_dir
        )
    except GatedRepoError as e:
        raise SourceError(
            f"{repo_id}: gated repo; accept its license on the Hub, then `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceError(
            f"{repo_id}: no such folder, and repo not found on the Hub (or private: log in with "
            f"`hf auth login`)"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceError(f"{repo_id}: revision {revision!r} not found") from e
    except HfHubHTTPError as e:
        raise SourceError(f"{repo_id}: download failed ({e}); re-run to resume") from e
    description = {
        "kind": "hub",
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": info.sha,
        "card": base_card_metadata(Path(local) / "README.md", info.gated),
    }
    return open_local(Path(local), description)


def remote_headers(repo_id: str, revision: str | None) -> Source:
    """A Hub transformer's config and safetensors headers, without downloading weights
    (headers are read with HTTP range requests). Good for planning, not for converting."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from qconvert.convert.safetensors_io import DTYPES, TensorInfo

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision)
        files = sorted(s.rfilename for s in info.siblings or [])
        prefix = "transformer/" if "model_index.json" in files else ""
        config_path = hf_hub_download(repo_id, f"{prefix}config.json", revision=info.sha)
        config = _read_json(Path(config_path))
        shard_files = [
            f
            for f in files
            if f.startswith(prefix) and f.endswith(".safetensors") and "/" not in f[len(prefix) :]
        ]
        headers = []
        for name in shard_files:
            meta = api.parse_safetensors_file_metadata(repo_id, name, revision=info.sha)
            path = Path(name)
            tensors = {}
            for key, t in meta.tensors.items():
                begin, end = t.data_offsets
                tensors[key] = TensorInfo(
                    path, key, DTYPES[t.dtype], tuple(t.shape), begin, end - begin
                )
            headers.append(Header(path, tensors, dict(meta.metadata or {})))
    except RepositoryNotFoundError as e:
        raise SourceError(f"{repo_id}: repo not found (or private: `hf auth login`)") from e
    except HfHubHTTPError as e:
        raise SourceError(f"{repo_id}: could not read headers ({e})") from e
    if not headers:
        raise SourceError(f"{repo_id}: no {prefix}*.safetensors weights in the repo")
    description = {
        "kind": "hub",
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": info.sha,
    }
    return Source(Path(repo_id), Path(repo_id) / prefix, config, headers, description)
