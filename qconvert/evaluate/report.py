"""What every measurement file records beside its numbers: device, versions; and how it is
written (atomically, with JSON-safe values)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

EXTRA_PACKAGES = ("torchmetrics", "triton", "mslk")
CPU_NOTE = (
    "measured on a CPU: CPU figures say nothing about GPU speed (qconvert's GPU kernels do not "
    "run; quantized weights are dequantized in software)"
)


def versions() -> dict[str, str]:
    """The manifest's library versions plus the ones measurements depend on."""
    from qconvert.manifest import versions as manifest_versions

    out = manifest_versions()
    for name in EXTRA_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    return out


def _driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def device_info(device: torch.device) -> dict[str, Any]:
    from qconvert.loaders import device_class

    if device.type != "cuda":
        return {
            "type": "cpu",
            "name": platform.processor() or platform.machine() or "CPU",
            "threads": torch.get_num_threads(),
            "class": "cpu",
        }
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": _driver(),
        "class": device_class(device),
    }


def device_label(info: dict[str, Any]) -> str:
    """One line for the card, e.g. "NVIDIA H200 (compute capability 9.0, driver 580.65)"."""
    if info["type"] != "cuda":
        return f"CPU ({info['name']}, {info['threads']} threads)"
    extra = [f"compute capability {info['compute_capability']}"]
    if info.get("driver"):
        extra.append(f"driver {info['driver']}")
    return f"{info['name']} ({', '.join(extra)})"


def _safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON (non-finite floats become null) through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(_safe(data), indent=2, allow_nan=False)
