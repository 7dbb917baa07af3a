"""Read safetensors shards straight onto a device, at disk / PCIe speed.

Headers are parsed once (``read_header``: ``qconvert.safetensors_io``'s checked parser, every
tensor's dtype, shape and absolute byte range). A ``Stream`` then fills one owned tensor per entry:

- CUDA: reader threads ``pread`` fixed-size chunks of the files into pinned host buffers (two
  per thread, so reading the next chunk overlaps the copy of the last) and enqueue
  non-blocking copies into the destination tensors, which are allocated up front. The page
  cache is used as is (warm loads read memory), nothing is mapped.
- CPU: reader threads ``pread`` straight into the destination tensors (no mmap, so no mapped
  file pages counted against the process).
- ``reader="safetensors"`` (or ``QCONVERT_LOAD_READER=safetensors``): ``safe_open(device=...)``
  tensor by tensor, for comparison.

Iterating a stream yields each entry as soon as its bytes are on the device (CUDA: its copies
are enqueued on the device's default stream, so later work on that stream sees them).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconvert import safetensors_io
from qconvert.errors import QconvertError
from qconvert.safetensors_io import TensorInfo as Entry

CHUNK = 16 * 2**20  # bytes per pread / staging buffer
SMALL = 2**20  # CUDA caching allocator: smaller blocks come from a pool of their own


class ReadError(QconvertError):
    """Shards that do not hold together while loading (a file cut short since its header was
    read, a tensor in two shards, an index without a weight_map); a damaged header is
    ``safetensors_io.SafetensorsError``."""


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """{tensor name: Entry} and the ``__metadata__`` map of one safetensors file, checked as
    the safetensors library checks it (``qconvert.safetensors_io``, the one parser)."""
    header = safetensors_io.read_header(path)
    return header.tensors, header.metadata


@dataclass
class _Chunk:
    path: Path
    start: int
    length: int
    pieces: list[tuple[Entry, int, int, int]]  # (entry, offset in entry, offset in chunk, n)


def _chunks(entries: Iterable[Entry], chunk: int) -> list[_Chunk]:
    """Fixed-size windows over each file's entries, in file order; an entry may span several."""
    out: list[_Chunk] = []
    by_file: dict[Path, list[Entry]] = {}
    for e in entries:
        by_file.setdefault(e.path, []).append(e)
    for path, group in by_file.items():
        group.sort(key=lambda e: e.start)
        current: _Chunk | None = None
        for e in group:
            done = 0
            while done < e.nbytes:
                pos = e.start + done
                if current is None or pos < current.start or pos >= current.start + chunk:
                    current = _Chunk(path, pos, 0, [])
                    out.append(current)
                n = min(e.nbytes - done, current.start + chunk - pos)
                current.pieces.append((e, done, pos - current.start, n))
                current.length = pos + n - current.start
                done += n
    return out


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ReadError(f"{path}: file ended early (truncated while loading?)")
        done += got


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _memoryview(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1, int(os.environ.get("QCONVERT_LOAD_THREADS", 8))))


class Stream:
    """Every entry read into a new tensor on ``device``, by reader threads that start at once
    (``start``) and run ahead of the consumer; iterate for ``(entry, tensor)`` as each one's
    bytes are on the device. Use as a context manager: leaving it stops the readers."""

    def __init__(
        self,
        entries: list[Entry],
        device: torch.device,
        reader: str | None = None,
        threads: int | None = None,
        staged: bool | None = None,
    ) -> None:
        self.reader = reader or os.environ.get("QCONVERT_LOAD_READER", "pread")
        if self.reader not in ("pread", "safetensors"):
            raise ValueError(
                f"QCONVERT_LOAD_READER must be pread or safetensors, not {self.reader!r}"
            )
        self.entries = entries
        self.device = device
        self.threads = threads or default_threads()
        self._cuda = device.type == "cuda"
        # Staged: read into per-thread buffers (pinned on CUDA), then copy out; CUDA always is,
        # CPU only when asked (tests run the CUDA path's logic that way).
        self._staged = self._cuda if staged is None else staged or self._cuda
        self._stop = threading.Event()
        self._done: queue.Queue[int | BaseException] = queue.Queue()
        self._pool: ThreadPoolExecutor | None = None
        self._fds: dict[Path, int] = {}
        self._chunks: list[_Chunk] = []
        self._dst: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Stream:
        if self.reader == "safetensors" or self._pool is not None:
            return self
        live = [e for e in self.entries if e.nbytes]
        if self._cuda:  # one cudaMalloc for the large tensors: the caching allocator splits it
            large = sum(-(-e.nbytes // 512) * 512 for e in live if e.nbytes > SMALL)
            torch.empty(large, dtype=torch.uint8, device=self.device)
        self._dst = {
            e.name: torch.empty(e.shape, dtype=e.dtype, device=self.device) for e in self.entries
        }
        self._chunks = _chunks(live, CHUNK)
        self._fds = {p: os.open(p, os.O_RDONLY) for p in {c.path for c in self._chunks}}
        self._next = iter(range(len(self._chunks)))
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="qconvert-load")
        for _ in range(min(self.threads, len(self._chunks))):
            self._pool.submit(self._work)
        return self

    def __iter__(self) -> Iterator[tuple[Entry, torch.Tensor]]:
        if self.reader == "safetensors":
            yield from _read_safe_open(self.entries, self.device)
            return
        self.start()
        for e in self.entries:
            if e.nbytes == 0:
                yield e, self._dst.pop(e.name)
        remaining = {e.name: e.nbytes for e in self.entries}
        for _ in range(len(self._chunks)):
            item = self._done.get()
            if isinstance(item, BaseException):
                raise item
            for e, _, _, n in self._chunks[item].pieces:
                remaining[e.name] -= n
                if remaining[e.name] == 0:
                    yield e, self._dst.pop(e.name)

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._dst = {}

    def _work(self) -> None:
        staging: list[tuple[torch.Tensor, memoryview, Any]] = []
        turn = 0
        try:
            with torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext():
                for _ in range(2 if self._staged else 0):
                    buf = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=self._cuda)
                    event = torch.cuda.Event() if self._cuda else _Done()
                    staging.append((buf, _memoryview(buf), event))
                while not self._stop.is_set():
                    with self._lock:
                        index = next(self._next, None)
                    if index is None:
                        return
                    c = self._chunks[index]
                    fd = self._fds[c.path]
                    if self._staged:
                        buf, view, event = staging[turn]
                        turn ^= 1
                        event.synchronize()  # the copy out of this buffer has finished
                        _pread_into(fd, view[: c.length], c.start, c.path)
                        for e, eoff, coff, n in c.pieces:
                            _as_bytes(self._dst[e.name])[eoff : eoff + n].copy_(
                                buf[coff : coff + n], non_blocking=True
                            )
                        event.record()
                    else:
                        for e, eoff, coff, n in c.pieces:
                            view = _memoryview(_as_bytes(self._dst[e.name]))[eoff : eoff + n]
                            _pread_into(fd, view, c.start + coff, c.path)
                    self._done.put(index)
        except BaseException as exc:  # handed to the consuming thread
            self._done.put(exc)
        finally:
            for _, _, event in staging:
                event.synchronize()  # a pinned buffer goes back only once its copy is done


class _Done:
    """A finished event: host-to-host copies are synchronous."""

    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


def _read_safe_open(
    entries: list[Entry], device: torch.device
) -> Iterator[tuple[Entry, torch.Tensor]]:
    from safetensors import safe_open

    by_file: dict[Path, list[Entry]] = {}
    for e in entries:
        by_file.setdefault(e.path, []).append(e)
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for e in sorted(group, key=lambda e: e.start):
                yield e, f.get_tensor(e.name)
