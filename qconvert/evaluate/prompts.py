"""The prompts a measurement uses: qconvert's default set, a user's file, or DrawBench.

- ``default``: 16 prompts shipped with qconvert (``data/prompts.jsonl``), two in each of eight
  DrawBench-like categories (text rendering, counting, colors, spatial relations, faces, animals,
  scenes, styles), ordered so that the first N cover N different categories.
- ``FILE``: ``.txt`` (one prompt per line; blank lines and lines starting with ``#`` skipped) or
  ``.jsonl`` (one object per line with a ``"prompt"`` string and an optional ``"category"``).
- ``drawbench``: the seed's set, the Hub dataset ``sayakpaul/drawbench`` (200 prompts), read
  through the Hub's dataset viewer API once and then cached as JSONL.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qconvert.evaluate.errors import EvalError

DEFAULT = "default"
DRAWBENCH = "drawbench"
DRAWBENCH_REPO = "sayakpaul/drawbench"
# The Hub's dataset viewer API (https://huggingface.co/docs/dataset-viewer): rows as JSON.
VIEWER = "https://datasets-server.huggingface.co"
_PAGE = 100  # the most rows the viewer returns per request


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str  # "default", "drawbench" or the file name
    prompts: list[Prompt]

    def describe(self) -> str:
        return {
            DEFAULT: "qconvert's default prompts",
            DRAWBENCH: f"DrawBench ({DRAWBENCH_REPO})",
        }.get(self.name, self.name)


def _parse_jsonl(text: str, where: str) -> list[Prompt]:
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}:{number}: not JSON ({e.msg})") from None
        text_ = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(text_, str) or not text_.strip():
            raise EvalError(
                f'{where}:{number}: expected an object with a non-empty "prompt" string'
            )
        category = row.get("category", "")
        if not isinstance(category, str):
            raise EvalError(f'{where}:{number}: "category" must be a string')
        out.append(Prompt(text_.strip(), category))
    return out


def parse_file(path: Path) -> list[Prompt]:
    """Prompts from a .txt or .jsonl file; errors name the file (and line)."""
    if path.suffix not in (".txt", ".jsonl"):
        raise EvalError(f"{path}: prompt files are .txt (one per line) or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{path}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: unreadable prompt file ({e})") from None
    if path.suffix == ".jsonl":
        prompts = _parse_jsonl(text, str(path))
    else:
        lines = (line.strip() for line in text.splitlines())
        prompts = [Prompt(line) for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise EvalError(f"{path}: no prompts in the file")
    return prompts


def default_prompts() -> list[Prompt]:
    data = resources.files("qconvert.evaluate").joinpath("data/prompts.jsonl")
    return _parse_jsonl(data.read_text(encoding="utf-8"), "qconvert default prompts")


def _viewer_rows(offset: int) -> dict[str, object]:
    query = urllib.parse.urlencode(
        {
            "dataset": DRAWBENCH_REPO,
            "config": "default",
            "split": "train",
            "offset": offset,
            "length": _PAGE,
        }
    )
    base = os.environ.get("QCONVERT_DATASET_VIEWER", VIEWER).rstrip("/")
    with urllib.request.urlopen(f"{base}/rows?{query}", timeout=30) as response:
        return json.loads(response.read().decode("utf-8"))


def fetch_drawbench() -> list[Prompt]:
    """DrawBench's prompts from the Hub (columns ``Prompts`` and ``Category``)."""
    prompts: list[Prompt] = []
    total = None
    while total is None or len(prompts) < total:
        page = _viewer_rows(len(prompts))
        rows = page.get("rows")
        if not isinstance(rows, list) or not rows:
            break
        for item in rows:
            row = item.get("row", {}) if isinstance(item, dict) else {}
            text = row.get("Prompts")
            if isinstance(text, str) and text.strip():
                prompts.append(Prompt(text.strip(), str(row.get("Category") or "")))
        total = int(page.get("num_rows_total", len(prompts)))  # type: ignore[call-overload]
    if not prompts:
        raise EvalError(f"--prompts drawbench: the Hub returned no prompts for {DRAWBENCH_REPO}")
    return prompts


def drawbench(cache_root: Path) -> list[Prompt]:
    """DrawBench, from the cache when it was fetched before; fetched (and cached) otherwise."""
    cached = cache_root / "prompts" / "drawbench.jsonl"
    if cached.is_file():
        return _parse_jsonl(cached.read_text(encoding="utf-8"), str(cached))
    how = f"run once online (the prompts are then cached in {cached}) or pass --prompts FILE"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise EvalError(f"--prompts drawbench: HF_HUB_OFFLINE is set and nothing is cached; {how}")
    try:
        prompts = fetch_drawbench()
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise EvalError(
            f"--prompts drawbench: cannot fetch {DRAWBENCH_REPO} from the Hub ({reason}); {how}"
        ) from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    lines = [json.dumps({"prompt": p.text, "category": p.category}) for p in prompts]
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, cached)
    return prompts


def load(spec: str | None, num: int | None, cache_root: Path) -> PromptSet:
    """The prompt set ``spec`` names (default, drawbench or a file), cut to ``num`` prompts."""
    spec = spec or DEFAULT
    if num is not None and num < 1:
        raise EvalError(f"--num-prompts {num}: must be at least 1")
    if spec == DEFAULT:
        prompts, name = default_prompts(), DEFAULT
    elif spec == DRAWBENCH:
        prompts, name = drawbench(cache_root), DRAWBENCH
    else:
        path = Path(spec)
        prompts, name = parse_file(path), path.name
    return PromptSet(name, prompts[:num] if num else prompts)
