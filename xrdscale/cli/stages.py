"""The stage commands (``xrdscale integrate``, ``sinogram``, ``absorption``, ``reconstruct``,
``denoise``), built from the stages' config models.

Every option of a stage command is a field of the stage's config
(:class:`xrdscale.stages.base.StageConfig`): its name (``q_range`` → ``--q-range``), help,
choices and default come from the model, and the values given are validated by the model,
so the command, the function and ``pipeline.<stage>`` of a campaign cannot drift apart.
An option left out takes the model's default. Every stage command also takes
``--workers N`` (a local Dask cluster) or ``--scheduler ADDRESS`` (an existing one).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing
from collections.abc import Callable, Iterator
from typing import Any, Optional

import typer
import yaml

from xrdscale.config import OneOf
from xrdscale.exceptions import ConfigError
from xrdscale.stages import STAGES, StageDef, load

logger = logging.getLogger(__name__)

_SIMPLE = (bool, int, float, str)


def _choices(info: Any) -> tuple[str, ...] | None:
    """The choices of a field typed ``Annotated[str, one_of(...)]`` (optional or not)."""
    metas = [*info.metadata, *(m for arg in typing.get_args(info.annotation) for m in getattr(arg, "__metadata__", ()))]
    for meta in metas:
        check = getattr(meta, "func", meta)
        if isinstance(check, OneOf):
            return check.choices
    return None


def _cli_type(annotation: Any) -> tuple[Any, bool]:
    """``(type for typer, parse_as_yaml)`` of a field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    base = args[0] if optional and len(args) == 1 else annotation
    origin = typing.get_origin(base)
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    if base in _SIMPLE:
        return Optional[base], False
    if origin is tuple and all(a in (int, float) for a in typing.get_args(base)):
        return Optional[base], False
    return Optional[str], True


def option_name(field_name: str) -> str:
    """``q_range`` → ``--q-range``."""
    return "--" + field_name.replace("_", "-")


def config_parameters(cls: Any, exclude: frozenset[str] = frozenset()) -> tuple[list[inspect.Parameter],
                                                                                   dict[str, bool]]:
    """typer parameters for every field of a config model, and which take YAML text."""
    params, yaml_fields = [], {}
    for name, info in cls.model_fields.items():
        if name in exclude:
            continue
        typ, as_yaml = _cli_type(info.annotation)
        choices = _choices(info)
        default = info.default
        shown = "model default" if default is None else repr(default) if as_yaml else str(default)
        text = (info.description or "").rstrip(".")
        text = f"{text[:1].upper()}{text[1:]}." if text else ""
        if choices:
            text += f" One of: {', '.join(choices)}."
        if as_yaml and not choices:
            text += " (a YAML value, e.g. [a, b], or a,b for a list)"
        text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"help": text.replace("[", "\\["), "show_default": False}
        flag = option_name(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if typ == Optional[bool] else [flag]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                                        default=typer.Option(None, *decls, **kwargs)))
        yaml_fields[name] = as_yaml
    return params, yaml_fields


def config_from_options(cls: Any, values: dict[str, Any], yaml_fields: dict[str, bool]) -> Any:
    """The config of the options given (``None`` = not given: the model's default)."""
    settings: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if yaml_fields.get(name) and isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{option_name(name)} {value!r}: not a valid value ({exc})") from exc
            if isinstance(parsed, str) and "list[" in str(cls.model_fields[name].annotation):
                parsed = [v.strip() for v in parsed.split(",") if v.strip()]  # a,b,c
            value = parsed
        settings[name] = value
    return cls.build(**settings)


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """Yield a distributed client for ``--workers``/``--scheduler``, or None (local threads)."""
    if workers is not None and scheduler is not None:
        raise ConfigError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    if workers is None and scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    from xrdscale.runtime.cluster import worker_environ

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    if workers is None or workers < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1")
    with worker_environ(), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client


def make_command(spec: StageDef) -> Callable[..., None]:
    """The typer command function of a stage: its inputs, its config's fields, the cluster options."""
    cls = load(spec.config)
    fields, yaml_fields = config_parameters(cls, spec.exclude)
    own = []
    for p in spec.params:
        kind: Any = list[str] if p.many else str
        if p.option:
            default = typer.Option(... if p.required else None, option_name(p.name), help=p.help)
            own.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                         annotation=kind if p.required else Optional[kind]))
        else:
            own.append(inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         default=typer.Argument(..., help=p.help), annotation=kind))
    cluster = [
        inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
                          default=typer.Option(None, "--workers", help="Start a local Dask cluster with N workers.")),
        inspect.Parameter("scheduler", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--scheduler", help="Address of a running Dask scheduler.")),
    ]
    positional = [p.name for p in spec.params if not p.option]
    extras = [p.name for p in spec.params if p.option]

    def command(**kwargs: Any) -> None:
        config = config_from_options(cls, {k: kwargs[k] for k in yaml_fields}, yaml_fields)
        run = load(spec.run)
        with dask_client(kwargs["workers"], kwargs["scheduler"]) as client:
            out = run(*(kwargs[n] for n in positional), config=config, client=client,
                      **{n: kwargs[n] for n in extras})
        typer.echo(out)

    params = [*[p for p in own if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD],
              *[p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY], *fields, *cluster]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = spec.name
    command.__doc__ = spec.help
    return command


def register(app: typer.Typer) -> None:
    """Add one command per top-level stage of :data:`xrdscale.stages.STAGES` to ``app``."""
    register_group(app, None)


def register_group(app: typer.Typer, group: str | None) -> None:
    """Add a command to ``app`` for every stage of :data:`xrdscale.stages.STAGES` in ``group``."""
    for spec in STAGES:
        if spec.group == group:
            app.command(spec.name, help=spec.help)(make_command(spec))
