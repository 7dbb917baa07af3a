"""Run a build: for each target, in spec order,

1. resolve the source (a Hub revision to its commit; a local folder to its file hashes),
2. compute the fingerprint (``fingerprint.py``),
3. up to date? With ``--push``: the target repo's ``qconvert.json`` records that fingerprint
   (that one file is downloaded, nothing else). Without: the local output records it.
4. else convert into ``<output-dir>/<target>/output`` (an interrupted conversion resumes: its
   finished shards are kept and re-checked; a build of other inputs is discarded first),
   record the fingerprint in the manifest, verify every file against it, run ``qconvert eval`` /
   ``qconvert bench`` when the spec asks and a CUDA GPU is there, write the card for the repo,
   and with ``--push`` publish it in one commit.

``--dry-run`` stops after 3 and plans from safetensors headers (Hub sources: range requests, no
weights downloaded). A failed target stops the run unless ``keep_going``; Ctrl-C stops it
always. Everything a run needs to download goes through huggingface_hub's cache (HF_HOME), one
for all targets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconvert.build import fingerprint as fpr
from qconvert.build.spec import AUTO, Spec, Target
from qconvert.build.summary import (
    BUILT,
    FAILED,
    INTERRUPTED,
    PLANNED,
    UP_TO_DATE,
    Summary,
    TargetResult,
)
from qconvert.errors import QconvertError

OUTPUT = "output"  # the converted folder inside a target's state folder
MARKER = "build.json"  # which fingerprint the state folder is building


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Options:
    output_dir: Path = Path("qconvert-build")
    push: bool = False
    keep_going: bool = False
    dry_run: bool = False
    device: str = "auto"
    progress: bool = True
    report: Callable[[str], None] = field(default=_stderr)


class BuildError(QconvertError):
    """A build step that failed; the message says which and what to do."""


def run_build(spec: Spec, targets: list[Target], options: Options) -> Summary:
    """Build ``targets`` (from ``spec``); never raises for a target's failure: see the summary."""
    runner = _Runner(options)
    results = [TargetResult(t.name, t.repo) for t in targets]
    stop = False
    for i, (target, result) in enumerate(zip(targets, results, strict=True), start=1):
        if stop:
            continue
        options.report(f"qconvert build: [{i}/{len(targets)}] {target.name} → {target.repo}")
        start = time.perf_counter()
        try:
            runner.target(target, result)
        except KeyboardInterrupt:
            result.status, stop = INTERRUPTED, True
            result.error = "interrupted; finished work is kept: re-run the same build to resume"
        except Exception as e:
            from qconvert.convert import Interrupted

            result.status = INTERRUPTED if isinstance(e, Interrupted) else FAILED
            result.error = _one_line(e)
            if not isinstance(e, QconvertError | OSError):  # a bug: keep its traceback
                options.report("".join(traceback.format_exception(e)).rstrip())
            stop = stop or result.status == INTERRUPTED or not options.keep_going
        result.seconds = round(time.perf_counter() - start, 3)
        options.report(f"qconvert build: {result.line()}")
    return Summary(str(spec.path), options.push, options.dry_run, results)


def _one_line(error: BaseException) -> str:
    from qconvert.convert import Interrupted

    text = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, Interrupted):
        return "interrupted; finished shards are kept: re-run the same build to resume"
    user_errors = (QconvertError, OSError)
    return text if isinstance(error, user_errors) and text else f"{type(error).__name__}: {text}"


class _Runner:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.sources = fpr.Sources()
        self._account: Any = None

    def account(self) -> Any:
        """Who HF_TOKEN (or the stored login) is; checked once, before the first conversion."""
        from qconvert.hub import login

        if self._account is None:
            self._account = login(None)
        return self._account

    def target(self, target: Target, result: TargetResult) -> None:
        opts = self.options
        identity = self.sources.identity(target)
        fp = fpr.fingerprint(target, identity)
        result.fingerprint = fp.digest
        state = opts.output_dir / target.name
        output = state / OUTPUT
        result.output = str(output)
        if opts.push:
            if fpr.published(target.repo) == fp.digest:
                from huggingface_hub import constants

                result.status, result.where = UP_TO_DATE, "hub"
                result.url = f"{constants.ENDPOINT}/{target.repo}"
                return
        elif _local_fingerprint(state, output) == fp.digest:
            result.status, result.where = UP_TO_DATE, "local"
            return
        if opts.dry_run:
            result.plan = _plan(target, identity)
            result.status = PLANNED
            return
        account = None
        if opts.push:  # refuse a repo we cannot write to before a long conversion
            from qconvert.hub import check_namespace

            account = self.account()
            check_namespace(account, target.repo)
        self._output(target, identity, fp, state, output, result)
        self._measure(target, output, result)
        from qconvert.cards import write_card

        write_card(output, target.repo)
        result.where = "local"
        if opts.push:
            from qconvert.hub import push

            pushed = push(output, target.repo, private=target.private, account=account)
            result.where, result.commit, result.url = "hub", pushed.commit, pushed.url
            if not pushed.changed:
                result.notes.append("the repo already had these files")
        result.status = BUILT

    def _output(
        self,
        target: Target,
        identity: dict[str, Any],
        fp: fpr.Fingerprint,
        state: Path,
        output: Path,
        result: TargetResult,
    ) -> None:
        """A verified output for this fingerprint: reused when a run before made it, else
        converted (resuming an interrupted conversion of the same fingerprint)."""
        from qconvert import manifest as mf

        previous = _read_json(state / MARKER)
        if previous is None or previous.get("fingerprint") != fp.digest:
            if state.exists():
                self.options.report(f"qconvert build: {target.name}: inputs changed; starting over")
                shutil.rmtree(state)
            state.mkdir(parents=True)
            _write_json(state / MARKER, fp.record(target))
        if (output / mf.MANIFEST).is_file():
            try:
                mf.verify(output, mf.load(output))
                _record(output, fp.record(target))
                result.notes.append("reused the output of an earlier run")
                return
            except (QconvertError, ValueError, OSError, KeyError, TypeError) as e:
                self.options.report(f"qconvert build: {target.name}: {e}; converting again")
                shutil.rmtree(output)
        self._convert(target, identity, state, output, result)
        data = mf.load(output)
        differs = fpr.source_differs(identity, data)
        if differs:
            shutil.rmtree(state)
            raise BuildError(f"{differs}; re-run the build")
        _record(output, fp.record(target))
        mf.verify(output, mf.load(output))

    def _convert(
        self, target: Target, identity: dict[str, Any], state: Path, output: Path, result: Any
    ) -> None:
        from qconvert.convert import DEFAULT_MAX_SHARD, OutputError, convert

        # an interrupted conversion's work folder (the converter's lock file may stay too)
        leftovers = [p for p in state.iterdir() if p.is_dir()]
        result.resumed = bool(leftovers)
        kwargs: dict[str, Any] = {
            "family": target.family,
            "fmt": target.fmt,
            "source": target.source,
            "revision": identity.get("commit"),
            "skips": target.skips,
            "only": target.only,
            "recipe_file": target.recipe,
            "strict": target.strict,
            "transformer_only": target.transformer_only,
            "max_shard_size": target.max_shard_size or DEFAULT_MAX_SHARD,
            "device": self.options.device,
            "progress": self.options.progress,
            "resume": True,
            "command": convert_command(target, identity),
        }
        try:
            convert(output, **kwargs)
        except OutputError as e:
            if not leftovers or not str(e).startswith("--resume:"):
                raise
            # the interrupted conversion is of other inputs as the converter sees them (e.g. the
            # local source folder was moved or its files touched): start it afresh, once
            self.options.report(f"qconvert build: {target.name}: cannot resume; starting over")
            for path in leftovers:
                shutil.rmtree(path)
            result.resumed = False
            convert(output, **kwargs)
        if result.resumed:
            result.notes.append("resumed an interrupted conversion")

    def _measure(self, target: Target, output: Path, result: TargetResult) -> None:
        """``qconvert eval`` / ``qconvert bench`` on the output, when the spec asks for them."""
        for kind, options in (("eval", target.eval), ("bench", target.bench)):
            if not options:
                continue
            why = _cannot_measure()
            if why:
                result.notes.append(f"{kind} skipped: {why}")
                self.options.report(f"qconvert build: {target.name}: {kind} skipped: {why}")
                continue
            # through the command line, in its own process: GPU memory is freed between targets
            argv = [sys.executable, "-m", "qconvert", kind, str(output), *_flags(options)]
            shown = shlex.join(["qconvert", *argv[3:]])
            self.options.report(f"qconvert build: {target.name}: {shown}")
            if subprocess.run(argv, check=False).returncode != 0:
                raise BuildError(f"`qconvert {kind}` failed (its output is above); fix, re-run")
            result.notes.append(f"{kind} ran")


def _cannot_measure() -> str | None:
    if importlib.util.find_spec("qconvert.evaluate") is None:
        return "this qconvert has no qconvert.evaluate"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    return None


def _flags(options: dict[str, Any]) -> list[str]:
    """Spec keys → command-line options: ``num-prompts = 32`` → ``--num-prompts 32``; a true
    boolean is a bare flag; a list is joined with commas."""
    out = []
    for key, value in options.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            out += [flag] if value else []
        elif isinstance(value, list):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def convert_command(target: Target, identity: dict[str, Any]) -> str:
    """The ``qconvert`` command that makes the same output, for the manifest and the card."""
    args = ["qconvert"]
    if target.family == AUTO:
        args += ["model", str(target.source)]
    else:
        args.append(target.family)
    args += ["--format", target.fmt]
    if target.source_kind == "tiny":
        args.append("--tiny")
    elif target.family != AUTO:
        args += ["--source", str(target.source)]
    if identity.get("commit"):
        args += ["--revision", str(identity["commit"])]
    if target.recipe:
        args += ["--recipe", target.recipe]
    for pattern in target.skips:
        args += ["--skip", pattern]
    for pattern in target.only:
        args += ["--only", pattern]
    if target.strict:
        args.append("--strict")
    if target.transformer_only:
        args.append("--transformer-only")
    if target.max_shard_size:
        args += ["--max-shard-size", str(target.max_shard_size)]
    return shlex.join(args)


def _plan(target: Target, identity: dict[str, Any]) -> dict[str, Any]:
    """--dry-run: the plan's summary, from safetensors headers only."""
    from qconvert.convert import DEFAULT_MAX_SHARD, families, plan_for, selection_for
    from qconvert.convert.converter import open_source
    from qconvert.convert.source import remote_headers
    from qconvert.formats import get_format

    fmt = get_format(target.fmt)
    selection = selection_for(target.skips, target.only, target.recipe)
    shard = target.max_shard_size or DEFAULT_MAX_SHARD
    if target.source_kind == "hub":
        src = remote_headers(str(target.source), identity["commit"])
        plan = plan_for(src, target.family, fmt, selection, target.strict, shard)
        return dict(plan.summary())
    tiny = families().get(target.family) if target.source_kind == "tiny" else None
    with open_source(target.source, tiny, None, target.transformer_only) as src:
        plan = plan_for(src, target.family, fmt, selection, target.strict, shard)
    return dict(plan.summary())


def _local_fingerprint(state: Path, output: Path) -> str | None:
    from qconvert import manifest as mf

    marker = _read_json(state / MARKER)
    data = _read_json(output / mf.MANIFEST)
    if marker is None or data is None:
        return None
    found = fpr.recorded(data)
    return found if found == marker.get("fingerprint") else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _record(output: Path, record: dict[str, Any]) -> None:
    """Add the "build" key to the output's manifest (atomically; nothing else changes)."""
    from qconvert import manifest as mf

    tmp = output / (mf.MANIFEST + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a run killed right here
    data = mf.load(output)
    data[fpr.BUILD_KEY] = record
    tmp.write_text(mf.dumps(data), encoding="utf-8")
    os.replace(tmp, output / mf.MANIFEST)
