"""The ``xrdscale`` command line: one typer app with a sub-app per area.

Only this module configures logging. User errors (:class:`xrdscale.exceptions.XrdscaleError`)
end with one ``error:`` line on stderr and exit status 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from xrdscale import __version__
from xrdscale.exceptions import XrdscaleError

app = typer.Typer(
    name="xrdscale",
    help="XRD-CT campaigns of working batteries to chemical maps with uncertainty.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xrdscale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-v info, -vv debug)."),
) -> None:
    """XRD-CT campaigns of working batteries to chemical maps with uncertainty."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)
    logging.getLogger("xrdscale").setLevel(min(level, logging.INFO))
    # pyFAI's silx probes for OpenCL on import and warns when it is absent: not our user's problem.
    logging.getLogger("silx.opencl.common").setLevel(logging.ERROR)


def _register() -> None:
    """Add every command: the stage commands (built from :data:`xrdscale.stages.STAGES`), then
    each module of this package that defines ``register(app)``, found by walking the package
    (no hand-kept list: a new command module is picked up by being here)."""
    import importlib
    import pkgutil

    from xrdscale.cli import stages as stage_commands

    stage_commands.register(app)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in ("stages", "__main__"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(app)


_register()


def main() -> None:
    """Entry point of the ``xrdscale`` script."""
    try:
        app()
    except XrdscaleError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
