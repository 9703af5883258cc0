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


#: Loggers of the engines that talk a lot at INFO (scheduler and nanny lifecycle, Ray start-up);
#: quiet (ERROR) unless -v. Other libraries log at WARNING unless -v.
CHATTY_LOGGERS: tuple[str, ...] = ("distributed", "distributed.client", "distributed.gc", "bokeh", "tornado",
                                   "tornado.application", "ray", "silx", "silx.opencl.common")


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Show the engines' logs too (Dask, Ray, torch, pyFAI): -v info, -vv debug."),
) -> None:
    """XRD-CT campaigns of working batteries to chemical maps with uncertainty."""
    # Quiet by default: xrdscale's own progress and results at INFO, other libraries' warnings,
    # and nothing of the chatty engines below ERROR. -v brings everything back at INFO, -vv at DEBUG.
    import dask

    verbose = min(verbose, 2)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[verbose]
    engines = logging.ERROR if verbose == 0 else level
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, show_level=True)
        handler.setFormatter(logging.Formatter("%(message)s" if verbose == 0 else "%(name)s: %(message)s",
                                               datefmt="[%X]"))
    else:  # a log file or a pipe: one plain line per record, no wrapping
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s " + ("%(message)s" if verbose == 0 else "%(name)s: %(message)s"),
            datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("xrdscale").setLevel(min(level, logging.INFO))
    for name in CHATTY_LOGGERS:
        chatty = logging.getLogger(name)
        chatty.setLevel(engines)
        chatty.handlers.clear()  # distributed may have added its own stderr handler: use ours
        chatty.propagate = True
    level_name = logging.getLevelName(engines).lower()
    # distributed configures its loggers from this when it is imported (here, later); worker
    # processes of local clusters take the level of this process's "distributed" logger, and
    # Ray's driver-side logger is set from xrdscale.ray.logging-level at ray.init.
    dask.config.set({"logging": {"distributed": level_name, "distributed.client": level_name,
                                 "distributed.gc": level_name, "bokeh": "error", "tornado": "critical",
                                 "tornado.application": "error"},
                     "xrdscale.ray.logging-level": level_name})
    if verbose == 0:
        import warnings

        # zarr 3 warns on every consolidated write (xrdscale consolidates on purpose: one read
        # opens a store on S3); the library's own filter around its writes is not thread-safe,
        # so the command (an application, not the library) silences it once. -v shows it.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part",
                                category=UserWarning)


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
