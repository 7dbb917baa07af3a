"""Third-party messages that qconvert triggers and that tell its user nothing to act on.

Each is filtered narrowly: on the one logger that emits it (or the one module that warns it),
by its message, so every other warning of those libraries still shows. Applied once when
``qconvert`` is imported, so the Python API is as quiet as the CLI.

- torchao: "Failed to load …/torchao/_C_*.so" per CUDA extension the wheel was not built for
  (its Python paths are what qconvert uses), and "Detected no triton" on machines without Triton
  (qconvert's loader says in its own log line which path runs and why).
- torch: "<enum …> is an Enum subclass … register_constant() …" when torchao registers its enums.
- diffusers: "Unable to import `torchao` Tensor objects" (a probe for torchao types that
  torchao ≥ 0.16 moved; loading qconvert's checkpoints does not use them).
- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to …Pil"
  (the fallback is what pipelines use; qconvert never runs the image processor).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

# (logger name, message pattern); re.search on the formatted message.
LOGGED = (
    ("torchao", r"^Failed to load \S*torchao[/\\]_C[^/\\\s]*\.(so|pyd):"),
    ("torchao.kernel.intmm", r"Detected no triton"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile"),
    (
        "diffusers.quantizers.torchao.torchao_quantizer",
        r"^Unable to import `torchao` Tensor objects",
    ),
    (
        "transformers.utils.import_utils",
        r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`",
    ),
)


# huggingface_hub's line on a push that changes nothing; qconvert's push says so itself.
EMPTY_COMMIT = r"^No files have been modified since last commit\. Skipping to prevent empty commit"


class _Drop(logging.Filter):
    """Drops the records of one logger whose message matches a pattern."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def apply() -> None:
    """Install the filters (idempotent). A logger's filters see only the records logged on
    it, so each goes on the exact logger that emits the message."""
    for name, pattern in LOGGED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))


@contextmanager
def dropped(logger_name: str, pattern: str) -> Iterator[None]:
    """Drop one logger's messages matching ``pattern`` while the block runs (for a message
    that qconvert replaces with its own line only around the call that triggers it)."""
    logger = logging.getLogger(logger_name)
    drop = _Drop(pattern)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
