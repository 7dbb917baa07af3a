"""The ``qconvert`` command line: Click only, a thin layer over the Python API.

One module per command group (``convert``: the family commands, ``model``, ``plan``,
``inspect``; ``hub``: ``push``, ``card``; ``build``: ``build``; ``measure``: ``eval``,
``bench``); ``common`` holds the error handler and the option groups they share.
"""

from __future__ import annotations

import click

from qconvert.cli.common import Group  # (importing qconvert applied qconvert.quiet)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qconvert")
def main() -> None:
    """Pre-quantize diffusion transformers to NVFP4 / MXFP8 / FP8 checkpoints that plain
    diffusers loads (bit-exact with torchao), and load them back fast.

    \b
    Examples:
      qconvert flux --format nvfp4 --tiny -o out/tiny-flux-nvfp4
      qconvert qwenimage --format mxfp8 --source ./Qwen-Image -o Qwen-Image-mxfp8
      qconvert model ./some-dit-pipeline --format nvfp4      # any diffusers transformer
      qconvert plan ltx2 --format nvfp4 --real-config        # what would be quantized, no weights
      qconvert inspect Qwen-Image-mxfp8 --verify
    """


def _register() -> None:
    from qconvert.cli import build, convert, hub, measure

    for module in (convert, hub, build, measure):
        for command in module.commands():
            main.add_command(command)


_register()

if __name__ == "__main__":
    main()
