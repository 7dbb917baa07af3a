"""Where the bf16 weights come from: a local diffusers folder, a Hub repo, or a tiny build."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qconvert.contain import ContainmentError, component_name, files_under, inside
from qconvert.errors import QconvertError
from qconvert.locate import looks_like_repo_id as looks_like_repo_id  # (moved; re-exported)
from qconvert.safetensors_io import Header, header_length, parse_header, read_header

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
        """The pipeline's component folders other than the transformer, from model_index
        (names checked when the source was opened)."""
        return [
            key
            for key in components(self.model_index, self.root / "model_index.json")
            if key != "transformer" and (self.root / key).is_dir()
        ]

    def component_files(self, transformer_only: bool) -> list[str]:
        """What a conversion copies verbatim, relative to ``root``: the base model's LICENSE
        files and, for a whole pipeline, model_index.json and the other components' files.
        Every path is checked to stay inside the source (``qconvert.contain``)."""
        where = f"{self.root}:"
        files = [
            inside(self.root, p.name, f"{where} license file")
            for p in sorted(self.root.glob("LICENSE*"))
        ]
        rels = [p.name for p in files if p.is_file()]
        if not transformer_only:
            rels.append("model_index.json")
            for name in self.component_dirs():
                rels += files_under(self.root, name, f"{where} component file")
        return rels


def components(model_index: dict[str, object], where: Path) -> list[str]:
    """The component names a model_index.json lists (sorted), each a plain folder name."""
    names = []
    for key, value in sorted(model_index.items()):
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if value[0] is not None:
            names.append(component_name(key, str(where)))
    return names


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SourceError(f"{path}: not readable JSON ({_one_line(e)})") from e
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _transformer_shards(root: Path, folder: str) -> list[Header]:
    """The transformer's safetensors headers; ``folder`` ("transformer" or "") is relative to
    the source ``root`` (and checked by the caller), and every file named, by the index too,
    must stay inside it."""
    tdir = root / folder if folder else root
    index = inside(tdir, WEIGHTS_INDEX, f"{tdir}: shard index")
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{index}: no weight_map; the checkpoint index is corrupt")
        files: dict[str, str] = {}
        for tensor, entry in weight_map.items():
            if not isinstance(entry, str):
                raise ContainmentError(
                    f"{index}: weight_map entry for tensor {tensor!r} is not a file name"
                )
            inside(tdir, entry, f"{index}: weight_map entry (tensor {tensor!r})")
            files.setdefault(entry, tensor)
        missing = [f for f in sorted(files) if not (tdir / f).is_file()]
        if missing:
            raise SourceError(
                f"{tdir}: shard {missing[0]} listed in {WEIGHTS_INDEX} is missing; "
                f"the download is incomplete"
            )
        paths = [tdir / f for f in sorted(files)]
    elif inside(tdir, WEIGHTS_FILE, f"{tdir}: weights file").is_file():
        paths = [tdir / WEIGHTS_FILE]
    else:
        found = sorted(p.name for p in tdir.glob("*.safetensors"))
        if not found:
            raise SourceError(
                f"{tdir}: no safetensors weights (expected {WEIGHTS_FILE} or {WEIGHTS_INDEX}); "
                f".bin checkpoints are not read (no pickle) — convert them to safetensors first"
            )
        paths = [inside(tdir, f, f"{tdir}: weights file") for f in found]
    return [read_header(p) for p in paths]


def open_local(path: Path, description: dict[str, object] | None = None) -> Source:
    """A local pipeline folder (model_index.json + transformer/) or a transformer folder.

    Everything read is checked to stay inside ``path`` (``qconvert.contain``)."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory; give a diffusers pipeline folder")
    if description is None:
        description = {"kind": "local", "path": str(path.resolve())}
        readme = inside(path, "README.md", f"{path}: card")
        if readme.is_file():
            description["card"] = base_card_metadata(readme)
    index_file = inside(path, "model_index.json", f"{path}:")
    if index_file.is_file():
        model_index = _read_json(index_file)
        names = components(model_index, index_file)
        tdir = inside(path, "transformer", f"{path}: component")
        config_file = inside(path, "transformer/config.json", f"{path}: transformer config")
        if "transformer" not in names or not config_file.is_file():
            raise SourceError(
                f"{path}: this pipeline has no transformer/ component (config.json); "
                f"qconvert converts diffusion-transformer pipelines"
            )
        config = _read_json(config_file)
        _check_transformer_class(model_index, config, index_file, config_file)
        shards = _transformer_shards(path, "transformer")
        return Source(path, tdir, config, shards, description, False, model_index)
    config_file = inside(path, "config.json", f"{path}: config")
    if config_file.is_file():
        config = _read_json(config_file)
        if "_class_name" in config and "_diffusers_version" in config:
            return Source(path, path, config, _transformer_shards(path, ""), description, True)
    raise SourceError(
        f"{path}: not a diffusers pipeline (no model_index.json) or transformer folder "
        f"(no diffusers config.json)"
    )


def _check_transformer_class(
    model_index: dict[str, object], config: dict[str, object], index: Path, config_file: Path
) -> None:
    """model_index.json's transformer class must be the one transformer/config.json builds."""
    entry = model_index.get("transformer")
    named = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    built = config.get("_class_name")
    if not isinstance(built, str) or not built:
        raise SourceError(f'{config_file}: no "_class_name" string; not a diffusers config')
    if isinstance(named, str) and named != built:
        raise SourceError(
            f"{index}: the transformer is listed as {named}, but {config_file} builds a {built}; "
            f"the pipeline folder is inconsistent (fix model_index.json or the config)"
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


def _unreachable(repo_id: str, error: BaseException) -> SourceError:
    """One line for a Hub that cannot be reached (or a cache that cannot be written)."""
    import errno

    from huggingface_hub import constants

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
        return SourceError(
            f"{repo_id}: cannot write the Hugging Face cache ({error.strerror}: "
            f"{error.filename}); free space or set HF_HOME, then re-run"
        )
    return SourceError(
        f"{repo_id}: could not reach the Hub at {constants.ENDPOINT} ({_one_line(error)}); "
        f"check the network (or HF_ENDPOINT, HF_HUB_OFFLINE) and re-run"
    )


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

    from qconvert.hub import network_errors

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        if "model_index.json" in files:
            index_path = api.hf_hub_download(
                repo_id, "model_index.json", revision=info.sha, cache_dir=cache_dir
            )
            names = components(_read_json(Path(index_path)), Path(index_path))
            folders = ["transformer"] if transformer_only else names
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
        raise SourceError(f"{repo_id}: download failed ({_one_line(e)}); re-run to resume") from e
    except network_errors() as e:
        raise _unreachable(repo_id, e) from None
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

    from qconvert.hub import network_errors

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
            headers.append(_remote_header(repo_id, name, str(info.sha)))
    except RepositoryNotFoundError as e:
        raise SourceError(f"{repo_id}: repo not found (or private: `hf auth login`)") from e
    except HfHubHTTPError as e:
        raise SourceError(f"{repo_id}: could not read headers ({_one_line(e)})") from e
    except network_errors() as e:
        raise _unreachable(repo_id, e) from None
    if not headers:
        raise SourceError(f"{repo_id}: no {prefix}*.safetensors weights in the repo")
    description = {
        "kind": "hub",
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": info.sha,
    }
    return Source(Path(repo_id), Path(repo_id) / prefix, config, headers, description)


def _remote_header(repo_id: str, name: str, commit: str) -> Header:
    """One Hub file's safetensors header, read with HTTP range requests (the first 100 kB, and
    the rest of the header if it is longer), checked as a local file's is."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, name, revision=commit, endpoint=constants.ENDPOINT)
    headers = build_hf_headers()

    def get(first: int, last: int) -> tuple[bytes, int]:
        response = get_session().get(
            url, headers={**headers, "range": f"bytes={first}-{last}"}, follow_redirects=True
        )
        hf_raise_for_status(response)
        total = str(response.headers.get("content-range", "")).rpartition("/")[2]
        size = int(total) if total.isdigit() else first + len(response.content)
        return response.content, size

    path = Path(name)
    head, size = get(0, 100_000)
    length = header_length(path, head, size)
    raw = head[8 : 8 + length]
    if len(raw) < length:
        more, _ = get(8 + len(raw), 8 + length - 1)
        raw += more
    return parse_header(path, raw[:length], size)
