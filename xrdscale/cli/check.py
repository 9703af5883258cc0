"""``xrdscale check PATH…``: check files and stores against the data contracts."""

from __future__ import annotations

import logging
from typing import Optional

import typer

from xrdscale.exceptions import ConfigError

logger = logging.getLogger(__name__)


def check(
    paths: list[str] = typer.Argument(..., help="Raw NeXus/HDF5 files, zarr stores, phase-library or campaign-spec "
                                                "YAMLs, model registry entries (any fsspec URL)."),
    kind: Optional[str] = typer.Option(
        None, "--kind", help="Check every PATH as this kind instead of detecting it: raw, patterns, sinogram, "
                             "volume, maps, unrolled, regions, truth, phases, spec or model."),
) -> None:
    """Check each PATH against its data contract: prints 'OK PATH (KIND)' or one line per problem.

    Exits with status 1 if any PATH has a problem.
    """
    from xrdscale.io import contracts

    if kind is not None and kind not in contracts.KINDS:
        raise ConfigError(f"--kind {kind!r}: expected one of {', '.join(contracts.KINDS)}")
    failed = False
    for path in paths:
        found, problems = contracts.check(path, kind)
        logger.debug("%s: checked as %s, %d problem(s)", path, found, len(problems))
        if problems:
            failed = True
            for problem in problems:
                typer.echo(problem)
        else:
            typer.echo(f"OK {path} ({found})")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``check`` command to ``app``."""
    app.command("check")(check)
