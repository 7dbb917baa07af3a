"""``qconvert eval`` and ``qconvert bench``: thin Click wrappers over ``qconvert.evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qconvert.cli.common import F, command_line, device_option, quiet_libraries, stack


def _measure_options(f: F) -> F:
    """Options `eval` and `bench` share."""
    options = [
        click.option(
            "--reference",
            default=None,
            metavar="PATH|REPO",
            help="bf16 pipeline to compare with [default: the source in the manifest; a tiny "
            "source is rebuilt from its seed].",
        ),
        click.option("--revision", default=None, help="Hub revision of --reference."),
        click.option(
            "--real-shape",
            is_flag=True,
            help="TARGET is a family: its real architecture with random weights, quantized in "
            "memory (no files; needs --format).",
        ),
        click.option(
            "--format",
            "formats",
            default=None,
            metavar="FMT[,FMT]",
            help="With --real-shape: the format(s) to measure, e.g. nvfp4,mxfp8,fp8.",
        ),
        click.option("--steps", type=int, default=None, help="Denoising steps [family's]."),
        click.option("--height", type=int, default=None, help="Image height [family's]."),
        click.option("--width", type=int, default=None, help="Image width [family's]."),
        click.option("--frames", type=int, default=None, help="Video frames (LTX-2) [121]."),
        device_option("Where both pipelines run."),
        click.option(
            "--results",
            type=click.Path(path_type=Path),
            default=None,
            metavar="DIR",
            help="Where the JSON (and picture) go [default: TARGET; with --real-shape: "
            "./<family>-<format>-real-shape; eval of several formats: one folder each "
            "under it].",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    ]
    return stack(options, f)


def _measure_target(target: str, opts: dict[str, Any], whole_pipeline: bool = True) -> Any:
    from qconvert.evaluate import subject_for

    formats = [f.strip() for f in opts.pop("formats").split(",")] if opts["formats"] else None
    return subject_for(
        target,
        reference=opts.pop("reference"),
        revision=opts.pop("revision"),
        real_shape=opts.pop("real_shape"),
        formats=formats,
        cache_root=opts.get("cache_root"),
        whole_pipeline=whole_pipeline,
    )


def _shared(opts: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """The keyword arguments eval and bench take alike from ``_measure_options``."""
    keys = ("steps", "height", "width", "frames", "device", "results")
    return {**{k: opts[k] for k in keys}, "progress": not quiet, "command": command_line()}


def _print_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _finish_measurement(
    data: dict[str, Any], subject: Any, written: list[Path], as_json: bool
) -> None:
    from qconvert.cards import CARD
    from qconvert.evaluate import into_output
    from qconvert.evaluate.report import dumps

    if written and into_output(subject, written[0].parent):  # the API re-rendered the card
        written.append(written[0].parent / CARD)
    if as_json:
        click.echo(dumps(data))
        return
    click.echo(data["setup"])
    click.echo(f"device: {data['device']}; reference: {data['reference']}")
    _print_rows(data["rows"])
    for note in data.get("notes", []):
        click.echo(f"note: {note}")
    click.echo("wrote " + ", ".join(map(str, written)))


_INTERRUPTED_MEASURE = (
    "interrupted; every finished generation is cached: re-run the same command to continue"
)


@click.command(name="eval")
@click.argument("target", metavar="OUTPUT|FAMILY")
@_measure_options
@click.option(
    "--prompts",
    default=None,
    metavar="default|drawbench|FILE",
    help="Prompt set: qconvert's 16 [default], DrawBench (fetched from the Hub once), or a "
    ".txt/.jsonl file.",
)
@click.option("--num-prompts", type=int, default=None, help="Use the first N prompts [all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Generator seed.")
@click.option(
    "--lpips",
    type=click.Choice(["alex", "vgg", "off"]),
    default="alex",
    show_default=True,
    help="LPIPS backbone (its ImageNet weights are downloaded once from torchvision's URL).",
)
@click.option(
    "--no-generate",
    is_flag=True,
    help="Weight SQNR and one transformer forward only: no images.",
)
@click.option(
    "--picture-prompts", type=int, default=4, show_default=True, help="Prompts in the picture."
)
@click.option(
    "--cache-dir",
    "cache_root",
    type=click.Path(path_type=Path),
    default=None,
    help="Generation cache [default: $QCONVERT_CACHE or ~/.cache/qconvert].",
)
def eval_command(target: str, **opts: Any) -> None:
    """Measure how much quality a qconvert output lost: the bf16 and the quantized pipeline
    generate the same prompts with the same seeds and settings (the family's seed settings:
    FLUX 1024² 28 steps, Qwen-Image 1024² 50 steps, LTX-2 768×512×121 40 steps; tiny builds
    at their own small size); LPIPS, PSNR, SSIM (per frame for video; audio: log-spectral
    distance), per-layer weight SQNR from the files, and one transformer forward's relative
    error. Writes quality.json and quality.png into the output and re-renders its card.
    Generations are cached: a second format reuses the bf16 images, Ctrl-C loses nothing.

    \b
    Examples:
      qconvert eval FLUX.1-dev-nvfp4                       # against its manifest's source
      qconvert eval out/tiny-flux-nvfp4 --num-prompts 2 --steps 2
      qconvert eval out/x --reference ./FLUX.1-dev --prompts drawbench --num-prompts 32
      qconvert eval flux --real-shape --format nvfp4 --num-prompts 2 --steps 4   # GPU
      qconvert eval flux --real-shape --format nvfp4,fp8 --results q/   # q/nvfp4, q/fp8
    """
    quiet_libraries()
    from qconvert.evaluate import evaluate_quality

    quiet, as_json = opts.pop("quiet"), opts.pop("as_json")
    try:
        subject = _measure_target(target, opts, whole_pipeline=not opts["no_generate"])
        data = evaluate_quality(
            subject,
            prompts=opts["prompts"],
            num_prompts=opts["num_prompts"],
            seed=opts["seed"],
            lpips=None if opts["lpips"] == "off" else opts["lpips"],
            generate=not opts["no_generate"],
            picture_prompts=opts["picture_prompts"],
            cache_root=opts["cache_root"],
            **_shared(opts, quiet),
        )
    except KeyboardInterrupt:
        click.echo(_INTERRUPTED_MEASURE, err=True)
        raise
    from qconvert.evaluate import quality_files, results_dir
    from qconvert.evaluate.quality import PICTURE, QUALITY

    if as_json and data.get("kind") == "quality-set":
        _finish_measurement(data, subject, [], as_json)
        return
    for report, where in quality_files(data, results_dir(subject, opts["results"])):
        written = [where / QUALITY] + ([where / PICTURE] if "picture" in report else [])
        _finish_measurement(report, subject, written, as_json)


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give batch sizes like 1,4") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{text!r}: batch sizes must be at least 1")
    return out


@click.command(name="bench")
@click.argument("target", metavar="OUTPUT|FAMILY")
@_measure_options
@click.option("--batch", default="1", show_default=True, metavar="N[,N]", help="Batch sizes.")
@click.option(
    "--compile", "compiled", is_flag=True, help="compile_repeated_blocks(fullgraph=True)."
)
@click.option("--cuda-graphs", is_flag=True, help="Also time the step as a CUDA graph replay.")
@click.option("--repeats", type=int, default=None, help="Timed step calls [GPU 10, CPU 3].")
@click.option("--warmup", type=int, default=None, help="Untimed step calls first [GPU 3, CPU 1].")
@click.option("--e2e-repeats", type=int, default=None, help="Timed pipeline calls [GPU 3, CPU 2].")
@click.option("--no-load", is_flag=True, help="Skip the cold/warm load timings.")
def bench_command(target: str, **opts: Any) -> None:
    """Measure how fast a qconvert output runs against bf16, in one process on this device:
    transformer step (median and spread after warm-up), end-to-end pipeline call at the
    family's settings, peak GPU memory, load-to-ready (cold where the page cache can be
    dropped, and warm), compile time. Writes speed.json into the output and re-renders its
    card. On a CPU it runs, but CPU figures say nothing about GPUs.

    \b
    Examples:
      qconvert bench FLUX.1-dev-nvfp4 --batch 1,4 --compile
      qconvert bench out/tiny-flux-nvfp4 --steps 2
      qconvert bench flux --real-shape --format nvfp4,mxfp8,fp8 --compile --batch 1,4 --results out/
    """
    quiet_libraries()
    from qconvert.evaluate import bench_speed

    quiet, as_json = opts.pop("quiet"), opts.pop("as_json")
    batches = _batches(opts.pop("batch"))
    try:
        subject = _measure_target(target, opts)
        data = bench_speed(
            subject,
            batches=batches,
            compile=opts["compiled"],
            cuda_graphs=opts["cuda_graphs"],
            repeats=opts["repeats"],
            warmup=opts["warmup"],
            e2e_repeats=opts["e2e_repeats"],
            load=not opts["no_load"],
            **_shared(opts, quiet),
        )
    except KeyboardInterrupt:
        click.echo("speed.json holds the pipelines measured before the interruption", err=True)
        raise
    from qconvert.evaluate import results_dir
    from qconvert.evaluate.bench import SPEED

    where = results_dir(subject, opts["results"])
    _finish_measurement(data, subject, [where / SPEED], as_json)


def commands() -> list[click.Command]:
    return [eval_command, bench_command]
