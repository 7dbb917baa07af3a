"""python -m qconvert.cli: the same as the qconvert command."""

from qconvert.cli import main

main()
