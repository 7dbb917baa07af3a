"""``qconvert eval``: generate with the bf16 and the quantized pipeline on the same prompts,
seeds and settings, compare, and write ``quality.json`` and the side-by-side picture.

Order: the weight SQNR from the files (no model loaded); then the bf16 pipeline generates every
prompt the cache lacks and runs one transformer forward on the first prompt's inputs; it is
freed; the quantized pipeline does the same. Every generation is cached as soon as it exists,
so an interrupted run loses nothing and a second format reuses the bf16 images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconvert.evaluate import cache as gc_
from qconvert.evaluate import metrics, report
from qconvert.evaluate.pipelines import (
    call_kwargs,
    capture_inputs,
    device_key,
    release,
    to_device,
)
from qconvert.evaluate.prompts import PromptSet
from qconvert.evaluate.settings import Settings, family

QUALITY = "quality.json"
PICTURE = "quality.png"
FORWARD = "__transformer_forward__"  # the cache's prompt slot for the forward check


@dataclass
class Options:
    prompts: PromptSet
    seed: int = 0
    lpips: str | None = "alex"  # "alex", "vgg" or None (off)
    lpips_backbone: dict[str, torch.Tensor] | None = None  # torchvision layout (tests: random)
    picture_prompts: int = 4
    generate: bool = True
    progress: bool = True


def _bar(items: list[Any], desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="prompt", disable=not enabled, leave=False)


def _timed(pipe: Any, kwargs: dict[str, Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _phase(
    subject: Any,
    variant: str | None,
    settings: Settings,
    options: Options,
    device: torch.device,
    store: gc_.GenerationCache,
    where: str,
) -> tuple[list[gc_.Sample], Any]:
    """One pipeline's generations (from the cache, else made and cached) and its forward."""
    identity = subject.identity(variant)
    prompts = options.prompts.prompts if options.generate else []
    keys = [gc_.key(identity, p.text, options.seed, settings.key(), where) for p in prompts]
    samples: list[gc_.Sample | None] = [store.get(k) for k in keys]
    fkey = gc_.key(identity, FORWARD, options.seed, settings.key(), where)
    forward = store.get_object(fkey)
    missing = [i for i, s in enumerate(samples) if s is None]
    if missing or forward is None:
        label = variant or "bf16"
        pipe = subject.load(variant, device)
        try:
            if forward is None:
                forward = _forward(subject, pipe, settings, options, device, store, where)
                store.put_object(fkey, forward)
            for i in _bar(missing, label, options.progress):
                kwargs = call_kwargs(subject, settings, prompts[i].text, options.seed, device)
                out, seconds = _timed(pipe, kwargs, device)
                sample = gc_.Sample.from_output(out, seconds)
                about = {"pipeline": identity, "prompt": prompts[i].text, "seed": options.seed}
                store.put(keys[i], sample, about)
                samples[i] = sample
        finally:
            del pipe
            release()
    return [s for s in samples if s is not None], forward


def _forward(
    subject: Any,
    pipe: Any,
    settings: Settings,
    options: Options,
    device: torch.device,
    store: gc_.GenerationCache,
    where: str,
) -> dict[str, Any]:
    """One transformer call on the first prompt's seeded inputs: {"inputs", "output"} for bf16;
    the quantized side reuses those inputs (so both see the same tensors): {"output"}."""
    ref_key = gc_.key(subject.identity(None), FORWARD, options.seed, settings.key(), where)
    ref = store.get_object(ref_key)
    if ref is not None:
        inputs = ref["inputs"]
    else:
        first = options.prompts.prompts[0].text
        inputs = capture_inputs(pipe, call_kwargs(subject, settings, first, options.seed, device))
    with torch.inference_mode():
        output = {"output": metrics.flatten(pipe.transformer(**to_device(inputs, device)))}
    if ref is None:
        output["inputs"] = to_device(inputs, torch.device("cpu"))
    return output


def _lpips(options: Options, device: torch.device) -> tuple[Any, dict[str, Any]]:
    from qconvert.evaluate import lpips

    if options.lpips is None:
        return None, {"net": None, "available": False, "why": "turned off (--lpips off)"}
    try:
        model = lpips.load(options.lpips, device, options.lpips_backbone)
    except lpips.LpipsUnavailable as e:
        return None, {"net": options.lpips, "available": False, "why": str(e)}
    backbone = "random (test)" if options.lpips_backbone is not None else "torchvision ImageNet"
    return model, {"net": options.lpips, "available": True, "backbone": backbone}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    psnr = metrics.pooled_psnr(rows)
    out: dict[str, Any] = {
        "psnr_db": None if math.isinf(psnr) else round(psnr, 4),
        "identical": math.isinf(psnr),
        "ssim": round(_mean([r["ssim"] for r in rows]) or 0.0, 6),
    }
    if all("lpips" in r for r in rows):
        out["lpips"] = round(_mean([r["lpips"] for r in rows]) or 0.0, 6)
        out["lpips_max"] = max(r["lpips"] for r in rows)
    if all("audio_lsd_db" in r for r in rows):
        out["audio_lsd_db"] = round(_mean([r["audio_lsd_db"] for r in rows]) or 0.0, 4)
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


TINY_NOTE = "tiny test pipeline with random weights: the figures say nothing about a real model"
REAL_SHAPE_NOTE = (
    "real architecture with random weights: quality figures are meaningless, timings are real"
)


def card_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's summary table (metric | value | note) from a quality report."""
    s, lp, n = data["metrics"], data["lpips"], len(data["prompts"])
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: Any, note: str) -> None:
        rows.append({"metric": metric, "value": value, "note": note})

    if n:
        if lp["available"]:
            worst = _fmt(s.get("lpips_max"))
            add(f"LPIPS ({lp['net']}) vs bf16", s["lpips"], f"0 = identical; worst prompt {worst}")
        else:
            add("LPIPS vs bf16", "not measured", lp["why"])
        psnr = "∞ (identical)" if s["identical"] else s["psnr_db"]
        add("PSNR vs bf16 (dB)", psnr, f"higher is better; pooled over {n} prompts")
        add("SSIM vs bf16", s["ssim"], "1 = identical")
        if "audio_lsd_db" in s:
            add("Audio log-spectral distance (dB)", s["audio_lsd_db"], "0 = identical")
    add(
        "Transformer forward, relative L2 vs bf16",
        data["forward"]["rel_l2"],
        "one call on the first prompt's seeded inputs",
    )
    sq = data["weights"]
    if sq["layers"]:
        note = f"{sq['layers']} quantized layers"
        if sq["worst"]:
            worst_layer = sq["worst"][0]
            note += f"; lowest: `{worst_layer['layer']}` {worst_layer['sqnr_db']:.2f} dB"
        add("Weight SQNR (dB), mean", sq["mean_db"], note)
    t = data["seconds_per_prompt"]
    if t.get("bf16") is not None and t.get("quantized") is not None:
        value = f"{t['bf16']:.3g} / {t['quantized']:.3g}"
        add("Seconds per prompt", value, "bf16 / quantized on this device (first generation)")
    return rows


def _setup(subject: Any, settings: Settings, options: Options, n: int) -> str:
    title = family(settings.family).title
    text = f"{'tiny ' if subject.tiny else ''}{title} {settings.describe()}"
    text += f"; {n} prompts ({options.prompts.describe()}), seed {options.seed}"
    if subject.tiny:
        text += f" — {TINY_NOTE}"
    if subject.real_shape:
        text += f" — {REAL_SHAPE_NOTE}"
    return text


def evaluate(
    subject: Any,
    settings: Settings,
    options: Options,
    device: torch.device,
    cache_root: Path,
    results: Path,
    command: str = "",
    variant: str | None = None,
) -> dict[str, Any]:
    """Run the evaluation of ``variant`` (default: the subject's first), write
    ``results/quality.json`` (+ the picture); returns the report."""
    from qconvert.evaluate import picture

    if options.generate:
        metrics.torchmetrics_image()  # missing: say so before any model loads
    store = gc_.GenerationCache(cache_root)
    where = device_key(device)
    variant = variant or subject.variants[0]
    # Per-layer SQNR: from the files before any model loads (real shape: made in memory with
    # the quantized transformer); cached, since it reads the whole checkpoint.
    skey = gc_.key(subject.identity(variant), "__weight_sqnr__", 0, {}, "weights")
    sqnr_rows = store.get_object(skey)
    if sqnr_rows is None and not subject.real_shape:
        sqnr_rows = subject.weight_sqnr()
        store.put_object(skey, sqnr_rows)
    ref_samples, ref_fwd = _phase(subject, None, settings, options, device, store, where)
    q_samples, q_fwd = _phase(subject, variant, settings, options, device, store, where)
    if sqnr_rows is None:
        sqnr_rows = subject.weight_sqnr()
        if sqnr_rows is not None:
            store.put_object(skey, sqnr_rows)
    sqnr_rows = sqnr_rows or []
    lpips_model, lpips_info = _lpips(options, device) if options.generate else (None, {})
    rows = []
    for prompt, ref, out in zip(options.prompts.prompts, ref_samples, q_samples, strict=False):
        row = {"prompt": prompt.text, "category": prompt.category, "seed": options.seed}
        row.update(metrics.compare(ref, out, lpips_model))
        row["seconds_bf16"] = round(ref.seconds, 4)
        row["seconds_quantized"] = round(out.seconds, 4)
        row["non_finite_pixels"] = ref.non_finite + out.non_finite
        rows.append(row)
    info = report.device_info(device)
    data: dict[str, Any] = {
        "kind": "quality",
        "schema": 1,
        "setup": _setup(subject, settings, options, len(rows)),
        "device": report.device_label(info),
        "reference": f"{subject.reference_text}, same prompts, seeds and settings",
        "command": command,
        "format": variant,
        "family": settings.family,
        "tiny": subject.tiny,
        "real_shape": subject.real_shape,
        "settings": settings.to_dict(),
        "prompt_set": options.prompts.name,
        "seed": options.seed,
        "device_info": info,
        "versions": report.versions(),
        "lpips": lpips_info or {"net": None, "available": False, "why": "no images generated"},
        "metrics": _summary(rows),
        "forward": {"rel_l2": round(metrics.rel_l2(ref_fwd["output"], q_fwd["output"]), 6)},
        "weights": {**metrics.summarize_sqnr(sqnr_rows), "per_layer": sqnr_rows},
        "seconds_per_prompt": {
            "bf16": _mean([r["seconds_bf16"] for r in rows]),
            "quantized": _mean([r["seconds_quantized"] for r in rows]),
        },
        "prompts": rows,
        "sentinels": "psnr_db is null with identical: true when outputs are bit-identical "
        "(infinite PSNR); sqnr_db is null with exact: true for a weight stored exactly",
    }
    notes = [report.CPU_NOTE] if device.type == "cpu" else []
    bad = sum(r["non_finite_pixels"] for r in rows)
    if bad:
        notes.append(
            f"{bad} output pixels were NaN/Inf (compared as 0): the settings may not suit this "
            f"pipeline (e.g. too few steps for its scheduler)"
        )
    data["notes"] = notes
    results.mkdir(parents=True, exist_ok=True)
    if rows:
        shown = list(zip(options.prompts.prompts, ref_samples, q_samples, strict=False))
        shown = shown[: max(1, options.picture_prompts)]
        sheet = picture.side_by_side([(p.text, a, b) for p, a, b in shown], ("bf16", variant))
        picture.write(results / PICTURE, sheet)
        data["picture"] = PICTURE
    data["rows"] = card_rows(data)
    report.write_json(results / QUALITY, data)
    return data
