"""``python -m xrdscale.cli``: the ``xrdscale`` command."""

from xrdscale.cli import main

main()
