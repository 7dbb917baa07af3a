"""What a build run did: per target status, as JSON (``--json``) and as Markdown, appended to
``$GITHUB_STEP_SUMMARY`` when that is set (GitHub Actions shows it on the run's page).

Exit codes: 0 every target built or up to date (or, with ``--dry-run``, planned); 1 a target
failed; 2 the spec is bad (nothing ran); 130 interrupted (Ctrl-C; re-run to resume).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUILT = "built"
UP_TO_DATE = "up to date"
PLANNED = "would build"
FAILED = "failed"
SKIPPED = "not run"  # after a failure without --keep-going, or after an interrupt
INTERRUPTED = "interrupted"
EXIT_OK, EXIT_FAILED, EXIT_SPEC, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class TargetResult:
    name: str
    repo: str
    status: str = SKIPPED
    seconds: float = 0.0
    fingerprint: str | None = None
    where: str | None = None  # "hub" or "local": what was found up to date / built into
    output: str | None = None  # the local output folder
    commit: str | None = None  # the repo's commit after the push (or the unchanged head)
    url: str | None = None
    resumed: bool = False  # an interrupted conversion was continued
    plan: dict[str, Any] | None = None  # --dry-run: the plan's summary
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def line(self) -> str:
        """One human line."""
        head = f"{self.name}: {self.status}"
        if self.status == UP_TO_DATE:
            head += f" ({self.repo} on the Hub)" if self.where == "hub" else f" ({self.output})"
        elif self.status == BUILT:
            head += f" in {self.seconds:.1f} s"
            head += (
                f", pushed to {self.repo} (commit {self.commit})"
                if self.commit
                else (f" into {self.output}")
            )
        elif self.status == PLANNED and self.plan:
            p = self.plan
            head += (
                f": {p['quantized_layers']}/{p['linear_layers']} Linear layers quantized, "
                f"size {float(p['size_ratio']):.3f}× bf16 → {self.repo}"
            )
        if self.error:
            head += f": {self.error}"
        extra = [n for n in self.notes if n]
        return head + (f" [{'; '.join(extra)}]" if extra else "")


@dataclass
class Summary:
    spec: str
    push: bool
    dry_run: bool
    results: list[TargetResult]

    @property
    def exit_code(self) -> int:
        found = {r.status for r in self.results}
        if INTERRUPTED in found:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if FAILED in found else EXIT_OK

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "push": self.push,
            "dry_run": self.dry_run,
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "targets": [asdict(r) for r in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def text(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        return "\n".join([*(r.line() for r in self.results), f"{self.spec}: {counts}"])

    def markdown(self) -> str:
        mode = " (dry run)" if self.dry_run else ""
        rows = [
            f"### qconvert build `{self.spec}`{mode}",
            "",
            "| target | status | repo | commit | time | notes |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            repo = f"[{r.repo}]({r.url})" if r.url else f"`{r.repo}`"
            commit = f"`{r.commit[:12]}`" if r.commit else ""
            notes = "; ".join([*r.notes, *([r.error] if r.error else [])]).replace("|", "\\|")
            seconds = f"{r.seconds:.1f} s" if r.seconds else ""
            rows.append(f"| `{r.name}` | {r.status} | {repo} | {commit} | {seconds} | {notes} |")
        counts = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        rows += ["", f"{counts}; exit code {self.exit_code}", ""]
        return "\n".join(rows)

    def write_step_summary(self) -> Path | None:
        """Append the Markdown to ``$GITHUB_STEP_SUMMARY`` when it is set; the file, or None."""
        where = os.environ.get("GITHUB_STEP_SUMMARY")
        if not where:
            return None
        path = Path(where)
        with path.open("a", encoding="utf-8") as f:
            f.write(self.markdown() + "\n")
        return path
