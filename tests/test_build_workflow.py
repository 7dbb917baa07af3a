"""examples/github-actions/build-artifacts.yml: actionlint passes it (a real run of the binary;
a missing binary is a failure, not a skip), actionlint does catch a broken copy, and the matrix
keys the workflow reads are the ones `qconvert build --list --json` writes (actionlint cannot
check a matrix that comes from fromJSON)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qconvert.cli import main

ROOT = Path(__file__).parent.parent
WORKFLOW = ROOT / "examples" / "github-actions" / "build-artifacts.yml"
SPEC = ROOT / "examples" / "build.toml"


def actionlint() -> str:
    beside = Path(sys.executable).with_name("actionlint")  # where the test extra installs it
    found = str(beside) if beside.is_file() else shutil.which("actionlint")
    if not found:
        pytest.fail("actionlint is not installed: pip install -e '.[test]'")
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [actionlint(), "-no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_the_example_workflow_passes_actionlint() -> None:
    result = lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        WORKFLOW.read_text().replace("needs.list.outputs.count", "needs.lst.outputs.count")
    )
    result = lint(broken)
    assert result.returncode == 1
    assert 'property "lst" is not defined' in result.stdout


def test_the_workflow_builds_one_job_per_target_of_the_listed_matrix() -> None:
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    jobs = flow["jobs"]
    assert jobs["list"]["outputs"]["matrix"] == "${{ steps.list.outputs.matrix }}"
    build = jobs["build"]
    assert build["needs"] == "list"
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.list.outputs.matrix) }}"
    assert build["concurrency"]["group"] == "qconvert-build-${{ matrix.target }}"
    assert build["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    cache = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"].startswith(build["env"]["HF_HOME"])
    run = next(s for s in build["steps"] if "qconvert build" in s.get("run", ""))
    assert (
        '--only "$TARGET" --push' in run["run"] and run["env"]["TARGET"] == "${{ matrix.target }}"
    )
    listed = next(s for s in jobs["list"]["steps"] if s.get("id") == "list")["run"]
    assert 'qconvert build "$SPEC" --list --json' in listed and "jq -c .matrix" in listed

    # every matrix key the workflow reads is in what --list --json writes for the example
    result = CliRunner().invoke(main, ["build", str(SPEC), "--list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["matrix"]["include"]
    used = set(re.findall(r"\$\{\{ matrix\.([A-Za-z0-9_-]+) \}\}", WORKFLOW.read_text()))
    assert used == {"target", "source-key"}
    assert all(used <= set(row) for row in rows)
    assert len({row["target"] for row in rows}) == len(rows) == 6
