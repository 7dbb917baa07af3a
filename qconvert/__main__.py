"""python -m qconvert: the same as the qconvert command."""

from qconvert.cli import main

main()
