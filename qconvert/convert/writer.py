"""Stream a plan's tensors into its output shards: read, quantize and write overlap.

Every shard's layout is fixed by the plan before anything is read (piece names, dtypes and
shapes come from ``Format.pieces``), so each quantized piece is written at its final offset as
soon as it exists: memory stays at a few tensors whatever the shard size. A reader thread
fetches the next source tensor while the current one is quantized, and a writer thread writes
the previous one. Finished shards are recorded with their sha256 in ``progress.json`` in the
work directory, which is what ``--resume`` trusts (after re-checking the hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qconvert.convert.plan import Item, Plan
from qconvert.convert.source import WEIGHTS_FILE, Source
from qconvert.manifest import sha256_file
from qconvert.safetensors_io import ShardWriter, Spec, open_reader, read_tensor

PROGRESS = "progress.json"
TENSOR_META = json.dumps({"_type": torch.Tensor.__name__})


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_FILE]
    return [
        f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]


def item_specs(item: Item) -> dict[str, Spec]:
    """The output tensors (torchao-flattened names) one source tensor becomes."""
    if item.fmt is None:
        return {item.info.name: (item.dtype or item.info.dtype, item.info.shape)}
    module, weight = item.info.name.rsplit(".", 1)
    return {
        f"{module}._{weight}_{suffix}": spec
        for suffix, spec in item.fmt.pieces(item.info.shape).items()
    }


def quantization_metadata(plan: Plan) -> dict[str, str]:
    """What every shard's safetensors metadata holds (as diffusers writes it): all tensor
    names and each weight's torchao subclass description."""
    metadata = {"format": "pt"}
    for item in plan.items:
        metadata[item.info.name] = (
            item.fmt.tensor_metadata(item.info.shape) if item.fmt else TENSOR_META
        )
    metadata["tensor_names"] = json.dumps([item.info.name for item in plan.items])
    return metadata


def _strings(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


@dataclass
class Progress:
    """Finished shards of an interrupted run, and what that run was converting: its fingerprint
    and the sha256 of each source shard (recorded as the hashing beside the conversion goes)."""

    path: Path
    fingerprint: dict[str, object]
    done: dict[str, str]  # shard file name → sha256
    sources: dict[str, str] = field(default_factory=dict)  # source shard (rel. path) → sha256
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> Progress | None:
        """The saved progress; None when there is none, ValueError when it is not ours."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"unreadable ({type(e).__name__})") from None
        if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), dict):
            raise ValueError("no fingerprint")
        if not _strings(data.get("done")) or not _strings(data.get("sources", {})):
            raise ValueError("malformed done or sources table")
        return cls(path, data["fingerprint"], dict(data["done"]), dict(data.get("sources", {})))

    def record_shard(self, name: str, digest: str) -> None:
        with self.lock:
            self.done[name] = digest
            self._save()

    def record_source(self, rel: str, digest: str, drop: tuple[str, ...] = ()) -> None:
        """Record a source shard's sha256 (and forget the finished shards ``drop``)."""
        with self.lock:
            for name in drop:
                self.done.pop(name, None)
            self.sources[rel] = digest
            self._save()

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        data = {"fingerprint": self.fingerprint, "done": self.done, "sources": self.sources}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


def finished_shards(progress: Progress, dst: Path, names: list[str]) -> set[str]:
    """Shards recorded as done (among this plan's shard ``names``) whose file still has the
    recorded hash."""
    ok = set()
    for name, digest in progress.done.items():
        path = dst / name
        if name in names and path.is_file() and sha256_file(path) == digest:
            ok.add(name)
    return ok


def _quantize(item: Item, tensor: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    if item.fmt is None:
        return {item.info.name: tensor if item.dtype is None else tensor.to(item.dtype)}
    weight = tensor.to(device=device, dtype=torch.bfloat16)
    quantized = item.fmt.quantize(weight, name=item.info.name.removesuffix(".weight"))
    flat, meta = flatten_tensor_state_dict({item.info.name: quantized})
    if meta[item.info.name] != item.fmt.tensor_metadata(item.info.shape):
        raise RuntimeError(f"{item.info.name}: torchao metadata differs from the format's; bug")
    return {k: v.to("cpu") for k, v in flat.items()}


def stream(
    plan: Plan,
    source: Source,
    dst: Path,
    device: torch.device,
    progress: Progress,
    show_bar: bool,
    skip: set[str] = frozenset(),
) -> dict[str, str]:  # type: ignore[assignment]
    """Write every shard not in ``skip``; returns {output tensor name: shard file name}."""
    names = shard_names(len(plan.shards))
    metadata = quantization_metadata(plan)
    weight_map = {
        key: name
        for name, shard in zip(names, plan.shards, strict=True)
        for item in shard
        for key in item_specs(item)
    }
    todo = [
        (name, shard) for name, shard in zip(names, plan.shards, strict=True) if name not in skip
    ]
    total = sum(i.info.nbytes for _, shard in todo for i in shard)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {
            h.path: stack.enter_context(open_reader(h.path)) for h in source.shards
        }
        bar = stack.enter_context(
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="converting",
                disable=not show_bar,
            )
        )
        reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="qconvert-read"))
        writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="qconvert-write"))
        work = [(name, shard, item) for name, shard in todo for item in shard]
        pending: deque[Future[None]] = deque()
        files: dict[str, ShardWriter] = {}

        def read(item: Item) -> torch.Tensor:
            return read_tensor(item.info, handles[item.info.path])

        def write(
            name: str,
            tensors: dict[str, torch.Tensor],
            last: bool,
            specs: Callable[[], dict[str, Spec]],
        ) -> None:
            if name not in files:
                files[name] = ShardWriter(dst / name, specs(), metadata)
            for key, t in tensors.items():
                files[name].put(key, t)
            if last:
                files.pop(name).close()
                progress.record_shard(name, sha256_file(dst / name))

        try:
            next_read = reader.submit(read, work[0][2]) if work else None
            for index, (name, shard, item) in enumerate(work):
                assert next_read is not None
                tensor = next_read.result()
                if index + 1 < len(work):
                    next_read = reader.submit(read, work[index + 1][2])
                tensors = _quantize(item, tensor, device)
                del tensor
                last = item is shard[-1]

                def specs(shard: list[Item] = shard) -> dict[str, Spec]:
                    return {k: v for i in shard for k, v in item_specs(i).items()}

                pending.append(writer.submit(write, name, tensors, last, specs))
                del tensors
                while len(pending) > 2 or (pending and pending[0].done()):
                    pending.popleft().result()
                bar.update(item.info.nbytes)
            while pending:
                pending.popleft().result()
        finally:
            writer.shutdown(wait=True, cancel_futures=True)  # no write may race the cleanup
            for f in list(files.values()):
                f.abort()
    return weight_map


def known_hashes(progress: Progress, prefix: str) -> dict[str, str]:
    """Output-relative paths → sha256 for shards hashed while writing."""
    return {f"{prefix}{name}": digest for name, digest in progress.done.items()}


def plan_digest(plan: Plan) -> str:
    """A hash of everything the plan decides: layers, formats, shard assignment."""
    data = {
        "layers": [[x.name, x.action, x.reason] for x in plan.layers],
        "shards": [
            [[i.info.name, i.fmt.name if i.fmt else (str(i.dtype) if i.dtype else None)] for i in s]
            for s in plan.shards
        ],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
