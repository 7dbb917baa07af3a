"""``qconvert bench``: the bf16 pipeline and the quantized one, side by side in one process,
one after the other on the same device → ``speed.json``.

Per pipeline: load-to-ready (cold, after the files are dropped from the page cache where the OS
allows it, then warm), compile time, then per batch size: one transformer step on the
pipeline's own first-step inputs (captured from a real call), median and spread over repeats
after warm-up (CUDA events on a GPU, ``perf_counter`` on a CPU), optionally replayed as a CUDA
graph; the whole pipeline call at the settings (after a 2-step warm-up); peak GPU memory.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qconvert.evaluate import report
from qconvert.evaluate.errors import EvalError
from qconvert.evaluate.pipelines import call_kwargs, capture_inputs, release
from qconvert.evaluate.prompts import default_prompts
from qconvert.evaluate.settings import Settings, family

SPEED = "speed.json"
GIB = 2**30


@dataclass
class Options:
    batches: tuple[int, ...] = (1,)
    compile: bool = False
    cuda_graphs: bool = False
    repeats: int | None = None  # timed step calls [GPU 10, CPU 3]
    warmup: int | None = None  # untimed step calls first [GPU 3, CPU 1]
    e2e_repeats: int | None = None  # timed pipeline calls [GPU 3, CPU 2]
    load: bool = True
    progress: bool = True

    def resolved(self, device: torch.device) -> Options:
        gpu = device.type == "cuda"
        return Options(
            self.batches,
            self.compile,
            self.cuda_graphs,
            self.repeats or (10 if gpu else 3),
            self.warmup if self.warmup is not None else (3 if gpu else 1),
            self.e2e_repeats or (3 if gpu else 2),
            self.load,
            self.progress,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "spread_pct": round(100 * (max(seconds) - min(seconds)) / median, 2) if median else None,
        "n": len(seconds),
        "samples_s": seconds,
    }


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> dict:
    """Median and spread of ``fn``'s time after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        out = []
        for _ in range(repeats):
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return stats(out)


def graph_timed(model: torch.nn.Module, inputs: dict[str, Any], repeats: int) -> dict:
    """The step captured once as a CUDA graph, then replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        model(**inputs)
    try:
        return timed(graph.replay, 1, repeats, torch.device("cuda"))
    finally:
        del graph


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, quantized pieces counted as stored."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        inner = t.data if isinstance(t, torch.nn.Parameter) else t
        names = getattr(inner, "tensor_data_names", None)
        if names:
            for n in [*names, *getattr(inner, "optional_tensor_data_names", [])]:
                part = getattr(inner, n, None)
                if part is not None:
                    total += part.numel() * part.element_size()
        else:
            total += inner.numel() * inner.element_size()
    return total


def drop_page_cache(files: list[Path]) -> str | None:
    """Evict ``files`` from the OS page cache; the method used, or None where it cannot."""
    if not files or not hasattr(os, "posix_fadvise"):
        return None
    os.sync()
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError:
        return None
    return "posix_fadvise(POSIX_FADV_DONTNEED)"


def _load(subject: Any, variant: str | None, device: torch.device, o: Options) -> tuple[Any, dict]:
    out: dict[str, Any] = {}
    files = subject.files(variant) if o.load else []
    if files:
        out["cold_method"] = drop_page_cache(files)
        t = time.perf_counter()
        pipe = subject.load(variant, device)
        _sync(device)
        out["cold_s" if out["cold_method"] else "first_s"] = time.perf_counter() - t
        del pipe
        release()
    t = time.perf_counter()
    pipe = subject.load(variant, device)
    _sync(device)
    out["warm_s" if files else "build_s"] = time.perf_counter() - t
    return pipe, out


def _step(pipe: Any, inputs: dict[str, Any], o: Options, device: torch.device) -> dict:
    """Compile time (first call, when compiling), step timings, CUDA-graph step timings."""
    row: dict[str, Any] = {}
    model = pipe.transformer
    if o.compile:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model(**inputs)
        _sync(device)
        row["compile_s"] = time.perf_counter() - t  # the first call at this batch size
    row["step"] = timed(lambda: model(**inputs), o.warmup or 0, o.repeats or 1, device)
    if o.cuda_graphs:
        try:
            row["step_cuda_graph"] = graph_timed(model, inputs, o.repeats or 1)
        except RuntimeError as e:
            row["step_cuda_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def _end_to_end(pipe: Any, make: Callable[[], dict[str, Any]], o: Options, device: torch.device,
                steps: int) -> dict:  # fmt: skip
    """Whole pipeline calls (PIL output, as users call it) after a 2-step warm-up; peak GPU
    memory over the timed calls."""
    warm = make()
    warm.update(num_inference_steps=min(2, steps), output_type="pil")
    with torch.inference_mode():
        pipe(**warm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"end_to_end": timed(lambda: pipe(**{**make(), "output_type": "pil"}), 0,
                               o.e2e_repeats or 1, device)}  # fmt: skip
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return row


def _measure(
    subject: Any, variant: str | None, settings: Settings, o: Options, device: torch.device
) -> list[dict[str, Any]]:
    torch._dynamo.reset()
    pipe, load = _load(subject, variant, device, o)
    name = variant or "bf16"
    prompt = default_prompts()[0].text
    rows = []
    try:
        weights = weight_bytes(pipe.transformer) / GIB
        if o.compile:
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        for i, batch in enumerate(o.batches):
            if o.compile and i:
                # Compile each batch size afresh with static shapes (as a process serving one
                # batch size would), not as dynamo's dynamic-shape recompile after a second one.
                torch._dynamo.reset()

            def make(batch: int = batch) -> dict[str, Any]:
                return call_kwargs(subject, settings, prompt, 0, device, batch)

            row: dict[str, Any] = {"pipeline": name, "batch": batch, "load": load}
            row["transformer_weights_gib"] = weights
            row.update(_step(pipe, capture_inputs(pipe, make()), o, device))
            row.update(_end_to_end(pipe, make, o, device, settings.steps))
            if variant is not None and getattr(subject, "runtime", None):
                row["runtime"] = subject.runtime.get(variant)
            rows.append(row)
    finally:
        del pipe
        torch._dynamo.reset()  # compiled code holds the model: let it go with the pipeline
        release()
    return rows


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def card_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The card's speed table: one row per pipeline and batch size, ratios to bf16."""
    base = {r["batch"]: r for r in results if r["pipeline"] == "bf16"}
    rows = []
    for r in results:
        b = base.get(r["batch"])
        step, e2e = r["step"]["median_s"], r["end_to_end"]["median_s"]
        load = r.get("load", {})
        row: dict[str, Any] = {
            "pipeline": r["pipeline"],
            "batch": r["batch"],
            "step ms": _r(step * 1000, 2),
            "step vs bf16": _r(step / b["step"]["median_s"]) if b else None,
            "end-to-end s": _r(e2e),
            "end-to-end vs bf16": _r(e2e / b["end_to_end"]["median_s"]) if b else None,
        }
        if "step_cuda_graph" in r:
            row["step ms (CUDA graph)"] = _r(r["step_cuda_graph"]["median_s"] * 1000, 2)
        row["peak GiB"] = _r(r.get("peak_gib"), 2)
        row["weights GiB"] = _r(r["transformer_weights_gib"], 2)
        row["load s (cold / warm)"] = (
            f"{load['cold_s']:.2f} / {load['warm_s']:.2f}"
            if "cold_s" in load
            else (f"– / {load['warm_s']:.2f}" if "warm_s" in load else None)
        )
        row["compile s"] = _r(r.get("compile_s"), 1)
        rows.append(row)
    drop = [k for k in rows[0] if all(row[k] is None for row in rows)] if rows else []
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def _setup(subject: Any, settings: Settings, o: Options, device: torch.device) -> str:
    fam = family(settings.family)
    parts = [f"{'tiny ' if subject.tiny else ''}{fam.title} {settings.describe()}"]
    parts.append(f"batch {', '.join(map(str, o.batches))}")
    parts.append(
        "torch.compile (compile_repeated_blocks, fullgraph)" if o.compile else "eager (no compile)"
    )
    parts.append(
        f"step: median of {o.repeats} after {o.warmup} warm-up; end to end: median of "
        f"{o.e2e_repeats} after a 2-step warm-up"
    )
    text = "; ".join(parts)
    if subject.real_shape:
        text += (
            " — real architecture with random weights (speed depends on shapes, not values); "
            "prompt embeddings precomputed, so text encoding is not timed"
        )
    return text


def run(
    subject: Any,
    settings: Settings,
    options: Options,
    device: torch.device,
    results: Path,
    command: str = "",
) -> dict[str, Any]:
    """Measure bf16 then each quantized variant; write ``results/speed.json`` after each (a
    run cut short keeps what it measured). Returns the report."""
    o = options.resolved(device)
    if o.cuda_graphs and device.type != "cuda":
        raise EvalError("--cuda-graphs needs a CUDA device")
    if not o.batches or any(b < 1 for b in o.batches):
        raise EvalError(f"--batch {o.batches}: batch sizes must be at least 1")
    info = report.device_info(device)
    data: dict[str, Any] = {
        "kind": "speed",
        "schema": 1,
        "setup": _setup(subject, settings, o, device),
        "device": report.device_label(info),
        "reference": f"{subject.reference_text}, in the same process on the same device",
        "command": command,
        "family": settings.family,
        "formats": list(subject.variants),
        "tiny": subject.tiny,
        "real_shape": subject.real_shape,
        "settings": settings.to_dict(),
        "options": {k: v for k, v in asdict(o).items() if k != "progress"},
        "device_info": info,
        "versions": report.versions(),
        "results": [],
        "rows": [],
    }
    notes = ["vs bf16: time ratio to the bf16 row of the same batch size (below 1: faster)"]
    if device.type != "cuda":
        notes.append(report.CPU_NOTE)
    if o.cuda_graphs:
        notes.append("CUDA graphs apply to the transformer step; end to end runs without them")
    data["notes"] = notes
    from tqdm.auto import tqdm

    variants = [None, *subject.variants]
    for variant in tqdm(variants, desc="bench", unit="pipeline", disable=not o.progress):
        data["results"] += _measure(subject, variant, settings, o, device)
        data["rows"] = card_rows(data["results"])
        report.write_json(results / SPEED, data)
    return data
