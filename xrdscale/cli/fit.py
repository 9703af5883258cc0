"""``xrdscale fit …``: the conventional full-profile fit PQ-Net is checked against.

``run SOURCE DATA OUT`` and ``compare MAPS_A MAPS_B OUT`` are stage commands built from
:class:`xrdscale.stages.fit.FitConfig` and :class:`xrdscale.stages.fit.FitCompareConfig`. (A
group cannot also take positional arguments of its own beside its subcommands, so the fit itself
is ``fit run``.)
"""

from __future__ import annotations

import typer

from xrdscale.cli.stages import register_group

app = typer.Typer(help="Full-profile fits of patterns and volumes, and comparisons of maps.", no_args_is_help=True)

register_group(app, "fit")


def register(root: typer.Typer) -> None:
    """Add ``xrdscale fit`` to the root command."""
    root.add_typer(app, name="fit")
