"""``xrdscale simulate …`` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Simulate phases, patterns and whole beamtimes with known truth.", no_args_is_help=True)
