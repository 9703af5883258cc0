"""The base of every configuration model of xrdscale, and how its errors read.

Every stage config, the campaign spec and the phase library derive from :class:`Model`:
frozen pydantic models that refuse unknown keys. :func:`format_errors` turns a pydantic
``ValidationError`` into one line per problem, each with its YAML path and, for a choice
or an unknown key, the valid values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError


class Model(BaseModel):
    """Frozen, ``extra="forbid"``: a typo in a key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class OneOf:
    """A choice among names; the message lists them (the CLI reads them for its help)."""

    choices: tuple[str, ...]
    what: str

    def __call__(self, value: str) -> str:
        if value not in self.choices:
            raise ValueError(f"unknown {self.what} {value!r}; expected one of {', '.join(self.choices)}")
        return value


def one_of(choices: tuple[str, ...] | list[str], what: str) -> AfterValidator:
    """The validator of a field whose value is one of ``choices``: ``Annotated[str, one_of(...)]``.

    ``what`` names the field in errors; the CLI reads the choices for its help.
    """
    return AfterValidator(OneOf(tuple(choices), what))


def yaml_path(parts: tuple[Any, ...], prefix: str = "") -> str:
    """``("cycles", 0, "datasets", 1, "id")`` → ``cycles[0].datasets[1].id``."""
    out = prefix
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "(top level)"


def _valid_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """The keys the model allows where ``loc`` points (for an unknown key at ``loc``)."""
    if model is None:
        return None
    candidates: list[Any] = [model]
    mapping = False  # the previous part was a dict field: this part is one of its keys
    for part in loc[:-1]:
        if isinstance(part, int) or mapping:
            mapping = False
            continue  # list items and dict keys: _models_in already looked through list[...]/dict[...]
        nxt: list[Any] = []
        for cls in candidates:
            fields = cls.model_fields
            if part in fields:
                nxt += _models_in(fields[part].annotation)
                mapping = mapping or _is_mapping(fields[part].annotation)
            elif any(f.default == part for f in fields.values()):
                nxt.append(cls)  # the tag of a discriminated union: the member itself
        candidates = nxt
    keys = sorted({k for cls in candidates for k in cls.model_fields})
    return keys or None


def _is_mapping(annotation: Any) -> bool:
    """True for ``dict[...]`` (optionally ``| None``)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is dict:
        return True
    return any(typing.get_origin(a) is dict for a in args)


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models inside an annotation (``X``, ``X | None``, ``list[X]``, unions)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def format_errors(exc: ValidationError, model: type[BaseModel] | None = None, *, prefix: str = "",
                  skip: tuple[str, ...] = ()) -> list[str]:
    """One ``path: message`` line per problem of ``exc``.

    Parameters
    ----------
    exc : pydantic.ValidationError
        The error.
    model : type, optional
        The validated model, to list the valid keys of an unknown key.
    prefix : str
        Path of the model in a larger document (``pipeline.integrate``).
    skip : tuple of str
        Location parts to leave out of paths (tags of discriminated unions).
    """
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in skip)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            keys = _valid_keys(model, tuple(err["loc"]))
            msg = "unknown key" + (f"; valid keys here are: {', '.join(keys)}" if keys else " (check the spelling)")
        elif err["type"] == "literal_error":
            ctx = err.get("ctx", {})
            msg = f"{err['input']!r} is not a valid choice; choose one of {ctx.get('expected', '')}"
        elif err["type"] not in ("value_error", "assertion_error", "missing") and "input" in err:
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{yaml_path(loc, prefix)}: {msg}")
    return lines
