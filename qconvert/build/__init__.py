"""``qconvert build``: CI artifact builds from one declarative spec (models × formats × recipes).

``spec`` reads and expands the TOML spec into targets; ``fingerprint`` says what an output is a
function of; ``run`` builds each target (up to date → nothing; else convert, verify, measure,
card, push); ``summary`` reports it as JSON and Markdown.
"""

from qconvert.build.run import BuildError, Options, convert_command, run_build
from qconvert.build.spec import Spec, SpecError, Target, listing, load_spec, render_listing
from qconvert.build.summary import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SPEC,
    Summary,
    TargetResult,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SPEC",
    "BuildError",
    "Options",
    "Spec",
    "SpecError",
    "Summary",
    "Target",
    "TargetResult",
    "convert_command",
    "listing",
    "load_spec",
    "render_listing",
    "run_build",
]
