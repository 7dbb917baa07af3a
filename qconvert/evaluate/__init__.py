"""Quality and speed of a qconvert output against its bf16 reference: ``qconvert eval`` and
``qconvert bench``.

One harness for both: family settings (``settings``), prompts (``prompts``), the bf16 and the
quantized pipelines (``pipelines``; ``realshape`` for the real architecture with random
weights), a generation cache (``cache``), metrics (``metrics``, ``lpips``), and the two
orchestrations, ``quality`` (→ quality.json + picture) and ``bench`` (→ speed.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qconvert.evaluate.errors import EvalError

__all__ = [
    "EvalError",
    "bench_speed",
    "card_for",
    "evaluate_quality",
    "into_output",
    "quality_files",
    "results_dir",
    "subject_for",
]


def subject_for(
    target: str | Path,
    reference: str | None = None,
    revision: str | None = None,
    real_shape: bool = False,
    formats: list[str] | None = None,
    seed: int = 0,
    cache_root: Path | None = None,
    whole_pipeline: bool = True,
) -> Any:
    """What to measure: a qconvert output folder (against ``reference`` or its manifest's
    source), or with ``real_shape`` a family name and formats (random weights, in memory)."""
    from qconvert.evaluate.cache import default_root

    if real_shape:
        from qconvert.evaluate.realshape import RealShapeSubject

        if reference:
            raise EvalError("--reference does not apply to --real-shape (random weights)")
        if not formats:
            raise EvalError("--real-shape needs --format (e.g. nvfp4, or nvfp4,mxfp8,fp8)")
        return RealShapeSubject(str(target), formats, seed)
    from qconvert.evaluate.pipelines import ArtifactSubject, open_artifact, resolve_reference

    if formats:
        raise EvalError("--format applies to --real-shape; an output's format is in its manifest")
    artifact = open_artifact(Path(target))
    root = cache_root or default_root()
    ref = resolve_reference(artifact, reference, revision, root, whole_pipeline)
    return ArtifactSubject(artifact, ref)


def _settings(subject: Any, overrides: dict[str, int | None]) -> Any:
    from qconvert.evaluate.settings import defaults

    return defaults(subject.family, tiny=subject.tiny).override(**overrides)


def evaluate_quality(
    subject: Any,
    *,
    prompts: str | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    device: str | None = "auto",
    lpips: str | None = "alex",
    lpips_backbone: dict[str, Any] | None = None,
    generate: bool = True,
    picture_prompts: int = 4,
    cache_root: Path | None = None,
    results: Path | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Evaluate ``subject`` (see ``subject_for``); writes quality.json + picture into
    ``results`` (default: the output folder). Returns the report. A real-shape subject of
    several formats is evaluated once per format (the bf16 generations come from the cache
    after the first), each into ``results/<format>/``; the return is then
    ``{"kind": "quality-set", "formats": {format: report}}``."""
    from qconvert.evaluate import prompts as prompt_sets
    from qconvert.evaluate import quality
    from qconvert.evaluate.cache import default_root

    root = cache_root or default_root()
    settings = _settings(
        subject, {"steps": steps, "height": height, "width": width, "frames": frames}
    )
    chosen = prompt_sets.load(prompts, num_prompts, root)
    options = quality.Options(
        chosen, seed, lpips, lpips_backbone, picture_prompts, generate, progress
    )
    where = results_dir(subject, results)
    dev = _device(subject, device)
    if len(subject.variants) == 1:
        data = quality.evaluate(subject, settings, options, dev, root, where, command)
        card_for(subject, where)
        return data
    reports = {
        v: quality.evaluate(subject, settings, options, dev, root, where / v, command, v)
        for v in subject.variants
    }
    return {"kind": "quality-set", "formats": reports}


def quality_files(data: dict[str, Any], where: Path) -> list[tuple[dict[str, Any], Path]]:
    """Each report of ``evaluate_quality``'s return with the folder its files went to."""
    if data.get("kind") == "quality-set":
        return [(d, where / v) for v, d in data["formats"].items()]
    return [(data, where)]


def results_dir(subject: Any, results: Path | None = None) -> Path:
    """Where a measurement's files go: ``results``, else the output folder (real shape:
    ``./<family>-<formats>-real-shape``)."""
    if results is not None:
        return results
    if subject.real_shape:
        return Path(f"{subject.family}-{'-'.join(subject.variants)}-real-shape")
    return subject.artifact.root


def into_output(subject: Any, results: Path) -> bool:
    """Whether measurement files in ``results`` belong to the output's card."""
    return not subject.real_shape and results.resolve() == subject.artifact.root.resolve()


def card_for(subject: Any, results: Path) -> Path | None:
    """Re-render the output's card when the measurement went into the output folder."""
    if not into_output(subject, results):
        return None
    from qconvert.cards import write_card

    return write_card(subject.artifact.root)


def _device(subject: Any, device: str | None) -> Any:
    from qconvert.convert.converter import resolve_device

    dev = resolve_device(str(device or "auto"))
    if subject.real_shape and dev.type != "cuda" and not subject.shrunk:
        raise EvalError(
            "--real-shape needs a CUDA GPU (the real models take hours on a CPU); on a CPU, "
            "measure a tiny output (qconvert flux --tiny ...)"
        )
    return dev


def bench_speed(
    subject: Any,
    *,
    batches: tuple[int, ...] = (1,),
    compile: bool = False,
    cuda_graphs: bool = False,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    device: str | None = "auto",
    repeats: int | None = None,
    warmup: int | None = None,
    e2e_repeats: int | None = None,
    load: bool = True,
    results: Path | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Benchmark ``subject``; writes speed.json into ``results`` (default: the output folder)."""
    from qconvert.evaluate import bench

    settings = _settings(
        subject, {"steps": steps, "height": height, "width": width, "frames": frames}
    )
    dev = _device(subject, device)
    options = bench.Options(
        batches=tuple(batches),
        compile=compile,
        cuda_graphs=cuda_graphs,
        repeats=repeats,
        warmup=warmup,
        e2e_repeats=e2e_repeats,
        load=load and not subject.real_shape,
        progress=progress,
    )
    where = results_dir(subject, results)
    data = bench.run(subject, settings, options, dev, where, command)
    card_for(subject, where)
    return data
