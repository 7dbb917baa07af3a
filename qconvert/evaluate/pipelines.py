"""What a measurement compares: a qconvert output and its bf16 reference, loaded and run.

The reference defaults to the source the manifest records: a local folder, a Hub repo at the
commit that was converted, or the tiny build rebuilt from its seed (checked against the hashes
the manifest holds). The bf16 pipeline loads through plain diffusers; the quantized one through
``qconvert.loaders`` for this device (``load_pipeline``; a transformer-only output is loaded
with ``load_transformer`` into the reference's pipeline).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qconvert.evaluate.errors import EvalError
from qconvert.evaluate.settings import FAMILIES, Settings


@dataclass
class Artifact:
    """A qconvert output folder and what its manifest says."""

    root: Path
    manifest: dict[str, Any]
    family: str
    formats: list[str]
    transformer_only: bool

    @property
    def transformer_dir(self) -> Path:
        return self.root if self.transformer_only else self.root / "transformer"

    @property
    def label(self) -> str:
        return "+".join(self.formats)

    @property
    def tiny(self) -> bool:
        """qconvert's tiny architecture (built from a seed, or a folder it was saved to): it is
        measured at the tiny pipeline's own small settings."""
        if self.manifest.get("source", {}).get("kind") == "tiny":
            return True
        return _is_tiny(self.family, self.transformer_dir / "config.json")


def _is_tiny(family: str, config_path: Path) -> bool:
    from qconvert import tiny as tiny_builds

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tiny = tiny_builds.module(family).TRANSFORMER
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return all(json.dumps(config.get(k)) == json.dumps(v) for k, v in tiny.items())


def open_artifact(path: Path) -> Artifact:
    from qconvert import manifest as mf
    from qconvert.cards import formats_of
    from qconvert.convert.recipes import recipe_for_class

    if not path.is_dir():
        raise EvalError(f"{path}: no such folder; give a qconvert output folder")
    manifest = mf.load(path)  # ManifestError: no manifest, or not readable
    if manifest.get("tool") != "qconvert":
        raise EvalError(f"{path / mf.MANIFEST}: not a qconvert manifest")
    try:
        name = str(manifest["recipe"]["name"])
        if name not in FAMILIES:
            found = recipe_for_class(str(manifest["source"]["class"]))
            name = found.name if found else name
        formats = formats_of(manifest)
    except (KeyError, TypeError) as e:
        raise EvalError(f"{path / mf.MANIFEST}: malformed ({e!r}); re-convert") from None
    if name not in FAMILIES:
        raise EvalError(
            f"{path}: a {manifest['source'].get('class')} ({name} recipe); qconvert eval and "
            f"bench know the {', '.join(FAMILIES)} families"
        )
    return Artifact(path, manifest, name, formats, bool(manifest.get("transformer_only")))


@dataclass
class Reference:
    """The bf16 weights a measurement compares against, as a local folder."""

    root: Path
    identity: str  # what the generation cache knows these weights by
    description: str
    pipeline: bool = field(init=False)

    def __post_init__(self) -> None:
        self.pipeline = (self.root / "model_index.json").is_file()

    @property
    def transformer_dir(self) -> Path:
        return self.root / "transformer" if self.pipeline else self.root


def folder_identity(root: Path) -> str:
    """A fingerprint of a folder's files (path, size, mtime): cheap, changes when they do."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        rows.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return f"folder:{root.resolve()}:{digest}"


def _tiny_reference(family: str, seed: int, cache_root: Path, manifest: dict[str, Any]) -> Path:
    """The tiny source rebuilt from its seed (once per qconvert version), checked against the
    source hashes the manifest recorded."""
    from qconvert import __version__, tiny
    from qconvert.manifest import sha256_file

    folder = cache_root / "tiny" / f"{family}-seed{seed}-qconvert{__version__}"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tiny.build(family, tmp, seed)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for row in manifest["source"].get("files", []):
        path = folder / str(row["path"])
        if path.suffix == ".safetensors" and (
            not path.is_file() or sha256_file(path) != row["sha256"]
        ):
            raise EvalError(
                f"{path}: the tiny {family} build of this qconvert differs from the one this "
                f"output was converted from; re-convert it, or pass --reference"
            )
    return folder


def _check_architecture(artifact: Artifact, ref: Reference) -> None:
    def config(folder: Path) -> dict[str, Any]:
        path = folder / "config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvalError(f"{folder}: no config.json; not a diffusers transformer") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: unreadable ({e})") from None
        return data

    mine, theirs = config(artifact.transformer_dir), config(ref.transformer_dir)
    if mine.get("_class_name") != theirs.get("_class_name"):
        raise EvalError(
            f"{ref.root}: the reference is a {theirs.get('_class_name')}, {artifact.root} a "
            f"{mine.get('_class_name')}; pass the --reference it was converted from"
        )
    for k in sorted(set(mine) | set(theirs)):
        if k.startswith("_") or k == "quantization_config":
            continue
        if mine.get(k) != theirs.get(k):
            raise EvalError(
                f"{ref.root}: another architecture than {artifact.root} ({k}: "
                f"{theirs.get(k)!r} vs {mine.get(k)!r}); pass the --reference it was converted from"
            )


def resolve_reference(
    artifact: Artifact,
    reference: str | None,
    revision: str | None,
    cache_root: Path,
    whole_pipeline: bool = True,
) -> Reference:
    """The reference folder: ``reference`` (a path or Hub repo id) or the manifest's source."""
    from qconvert.convert.source import SourceError, download, looks_like_repo_id

    src = artifact.manifest["source"]
    try:
        if reference and looks_like_repo_id(reference):
            local = download(reference, revision, not whole_pipeline, None)
            ref = Reference(local.root, f"hub:{reference}@{local.description['commit']}", reference)
        elif reference:
            path = Path(reference)
            if not path.is_dir():
                raise EvalError(f"--reference {reference}: no such folder or Hub repo")
            ref = Reference(path, folder_identity(path), f"local folder {path}")
        elif src.get("kind") == "tiny":
            folder = _tiny_reference(
                artifact.family, int(src["seed"]), cache_root, artifact.manifest
            )
            identity = f"tiny:{artifact.family}:seed{src['seed']}:{folder.name}"
            ref = Reference(folder, identity, f"qconvert's tiny build, seed {src['seed']}")
        elif src.get("kind") == "hub":
            repo, commit = str(src["repo_id"]), str(src["commit"])
            local = download(repo, commit, not whole_pipeline, None)
            ref = Reference(local.root, f"hub:{repo}@{commit}", f"{repo} at commit {commit}")
        else:
            path = Path(str(src.get("path", "")))
            if not path.is_dir():
                raise EvalError(
                    f"{artifact.root}: its source folder {path} is gone; pass --reference"
                )
            ref = Reference(path, folder_identity(path), f"local folder {path}")
    except SourceError as e:
        raise EvalError(f"reference: {e}") from None
    _check_architecture(artifact, ref)
    return ref


def device_key(device: torch.device) -> str:
    """Where a generation ran, for the cache: device, runtime class, library versions."""
    import diffusers
    import torchao

    from qconvert.loaders import device_class

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"{device.type}:{device_class(device)}:{name}:torch {torch.__version__}:"
        f"torchao {torchao.__version__}:diffusers {diffusers.__version__}"
    )


def release() -> None:
    """Give memory back once the caller has dropped its references (``del``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ArtifactSubject:
    """A qconvert output against its bf16 reference."""

    real_shape = False
    shrunk = False

    def __init__(self, artifact: Artifact, ref: Reference) -> None:
        self.artifact = artifact
        self.ref = ref
        self.family = artifact.family
        self.tiny = artifact.tiny
        self.variants = [artifact.label]
        files = json.dumps(artifact.manifest["files"], sort_keys=True)
        self.quant_identity = f"qconvert:{hashlib.sha256(files.encode()).hexdigest()[:16]}"
        self.ref_identity = ref.identity
        self.reference_text = f"bf16 pipeline ({ref.description}) through diffusers"

    def identity(self, variant: str | None) -> str:
        return self.ref_identity if variant is None else self.quant_identity

    def describe(self) -> str:
        return f"{self.artifact.root.name} ({self.artifact.label})"

    def load(self, variant: str | None, device: torch.device) -> Any:
        """The bf16 pipeline (``variant`` None) or the quantized one, on ``device``."""
        from diffusers import AutoModel, DiffusionPipeline

        from qconvert.loaders import load_pipeline, load_transformer

        bf16 = torch.bfloat16
        if variant is None:
            if self.ref.pipeline:
                return _quiet(
                    DiffusionPipeline.from_pretrained(self.ref.root, dtype=bf16).to(device)
                )
            if self.artifact.transformer_only:
                raise EvalError(
                    f"neither {self.artifact.root} nor {self.ref.root} holds a whole pipeline; "
                    f"pass --reference PIPELINE (or --no-generate for weight metrics only)"
                )
            transformer = AutoModel.from_pretrained(self.ref.root, dtype=bf16)
            pipe = DiffusionPipeline.from_pretrained(
                self.artifact.root, transformer=transformer, dtype=bf16
            )
            return _quiet(pipe.to(device))
        if not self.artifact.transformer_only:
            return _quiet(load_pipeline(self.artifact.root, device=device))
        if not self.ref.pipeline:
            raise EvalError(
                f"neither {self.artifact.root} nor {self.ref.root} holds a whole pipeline; "
                f"pass --reference PIPELINE (or --no-generate for weight metrics only)"
            )
        transformer = load_transformer(self.artifact.root, device=device)
        pipe = DiffusionPipeline.from_pretrained(self.ref.root, transformer=transformer, dtype=bf16)
        return _quiet(pipe.to(device))

    def files(self, variant: str | None) -> list[Path]:
        """The files a load of this pipeline reads (to drop from the page cache)."""
        roots = [self.ref.root] if variant is None else [self.artifact.root]
        if variant is not None and self.artifact.transformer_only:
            roots.append(self.ref.root)
        return [p for r in roots for p in r.rglob("*") if p.is_file()]

    def prompt_inputs(self, prompt: str, device: torch.device) -> dict[str, Any]:
        return {"prompt": prompt}

    def weight_sqnr(self) -> list[dict[str, Any]]:
        """Per-layer SQNR of the stored weights against the reference's, from the files."""
        from qconvert.evaluate.metrics import file_sqnr

        layers = [x for x in self.artifact.manifest["layers"] if x["action"] != "keep"]
        try:
            return file_sqnr(self.ref.transformer_dir, self.artifact.transformer_dir, layers)
        except ValueError as e:
            raise EvalError(str(e)) from None


class _Captured(Exception):
    pass


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def capture_inputs(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the pipeline's first transformer call (the call is stopped
    there: text encoding and latent preparation run, no denoising step)."""
    store: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        if args:
            raise EvalError("the pipeline calls its transformer positionally; cannot capture")
        store.update(_clone(kw))
        raise _Captured

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(**kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not store:
        raise EvalError("the pipeline never called its transformer")
    return store


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def call_kwargs(
    subject: Any, settings: Settings, prompt: str, seed: int, device: torch.device, batch: int = 1
) -> dict[str, Any]:
    """Everything one pipeline call takes: settings, prompt inputs, a seeded CPU generator."""
    kwargs = settings.kwargs(batch)
    kwargs.update(subject.prompt_inputs(prompt, device))
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    kwargs["output_type"] = "pt"
    return kwargs
