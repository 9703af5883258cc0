"""The linear EMR → Li stoichiometry calibration, fitted from reference states with its uncertainty.

The XCS paper calibrates the electron momentum ratio of Li_x Ni0.6 Mn0.2 Co0.2 O2 against
Li contents measured by ICP-AES (its Figure S5, Table 1): x = a + b · EMR. A
:class:`Calibration` is that least-squares line, its parameter covariance (from the
residuals, or from the points' EMR uncertainties when every point has one), R², and the
points it came from; :meth:`Calibration.predict` turns EMR maps (with their Poisson σ) into
x maps with σ from both the fit and the EMR.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xrdscale.exceptions import InputError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: the paper's Table 1 (EMR, x) pairs: 0.1 C pristine … end of discharge, and 1 C end of charge, discharging
PAPER_TABLE1 = ((1.21, 1.01), (1.11, 0.93), (0.31, 0.26), (0.69, 0.57), (1.09, 0.91), (0.80, 0.66), (0.94, 0.78))


@dataclass(frozen=True)
class Calibration:
    """x = intercept + slope · EMR, fitted by least squares.

    Attributes
    ----------
    slope, intercept : float
        The line.
    covariance : ndarray
        ``(2, 2)`` covariance of (intercept, slope); zeros when two points fix the line
        exactly and no EMR uncertainty was given.
    r2 : float
        Coefficient of determination of x.
    residual_std : float
        RMS residual in x (n − 2 degrees of freedom; 0 for two points).
    emr, x : tuple of float
        The points of the fit.
    labels : tuple of str
        Their names (states), if given.
    """

    slope: float
    intercept: float
    covariance: np.ndarray
    r2: float
    residual_std: float
    emr: tuple[float, ...]
    x: tuple[float, ...]
    labels: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n(self) -> int:
        """Number of calibration points."""
        return len(self.emr)

    @property
    def slope_std(self) -> float:
        """1σ of the slope."""
        return float(np.sqrt(self.covariance[1, 1]))

    @property
    def intercept_std(self) -> float:
        """1σ of the intercept."""
        return float(np.sqrt(self.covariance[0, 0]))

    def predict(self, emr: Any, emr_std: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(x, x_std)`` at ``emr``: σ² = b² σ_EMR² + [1, EMR] Cov [1, EMR]ᵀ."""
        e = np.asarray(emr, dtype=np.float64)
        x = self.intercept + self.slope * e
        cov = self.covariance
        var = cov[0, 0] + 2 * cov[0, 1] * e + cov[1, 1] * e ** 2
        if emr_std is not None:
            var = var + self.slope ** 2 * np.asarray(emr_std, dtype=np.float64) ** 2
        return x, np.sqrt(np.clip(var, 0, None))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what :func:`save` writes)."""
        return {"model": "x = intercept + slope * emr", "slope": self.slope, "intercept": self.intercept,
                "covariance": self.covariance.tolist(), "r2": self.r2, "residual_std": self.residual_std,
                "slope_std": self.slope_std, "intercept_std": self.intercept_std,
                "points": [{"emr": e, "x": x, **({"label": lab} if lab else {})}
                           for e, x, lab in zip(self.emr, self.x, self.labels or [""] * self.n, strict=True)]}

    def summary(self) -> str:
        """One paragraph for a terminal."""
        return (f"x = ({self.intercept:.4f} ± {self.intercept_std:.4f}) + ({self.slope:.4f} ± {self.slope_std:.4f})"
                f" · EMR   (n = {self.n}, R² = {self.r2:.5f}, residual σ = {self.residual_std:.4f})")


def fit(emr: Sequence[float], x: Sequence[float], *, emr_std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None) -> Calibration:
    """Fit x = a + b · EMR by ordinary least squares.

    The covariance is s² (AᵀA)⁻¹ with s² the residual variance (n − 2 degrees of freedom);
    with exactly two points there is no residual, and the covariance comes from
    ``emr_std`` if given (propagated through the line), else it is zero (logged).

    Raises
    ------
    InputError
        Fewer than two points, non-finite values, or all EMR values equal (a singular fit).
    """
    e = np.asarray(emr, dtype=np.float64).ravel()
    xs = np.asarray(x, dtype=np.float64).ravel()
    if e.size != xs.size:
        raise InputError(f"the calibration needs one x per EMR: got {e.size} EMR values and {xs.size} x values")
    if e.size < 2:
        raise InputError(f"a linear calibration needs at least two (EMR, x) points; got {e.size}. "
                         "Add reference states of known Li content")
    if not (np.isfinite(e).all() and np.isfinite(xs).all()):
        raise InputError("the calibration points contain NaN or infinite values; remove or fix those rows")
    design = np.stack([np.ones_like(e), e], axis=1)
    gram = design.T @ design
    spread = float(np.ptp(e))
    if spread <= 1e-9 * max(1.0, float(np.abs(e).max())) or np.linalg.cond(gram) > 1e12:
        raise InputError(f"the calibration is singular: every EMR value is {e[0]:.6g}, so no slope can be fitted. "
                         "Use reference states of different Li content")
    inv = np.linalg.inv(gram)
    intercept, slope = inv @ design.T @ xs
    resid = xs - (intercept + slope * e)
    dof = e.size - 2
    s2 = float(resid @ resid) / dof if dof > 0 else 0.0
    cov = s2 * inv
    if dof == 0:
        if emr_std is not None:
            sd = np.asarray(emr_std, dtype=np.float64).ravel()
            # the line through two points: x-errors of slope·σ_EMR at each point propagated to (a, b)
            jac = inv @ design.T
            cov = jac @ np.diag((slope * sd) ** 2) @ jac.T
        else:
            logger.warning("two calibration points fix the line exactly: its uncertainty is not estimated")
    ss_tot = float(((xs - xs.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else 1.0
    return Calibration(slope=float(slope), intercept=float(intercept), covariance=np.asarray(cov, dtype=np.float64),
                       r2=r2, residual_std=float(np.sqrt(s2)), emr=tuple(float(v) for v in e),
                       x=tuple(float(v) for v in xs), labels=tuple(labels) if labels is not None else ())


def read_table(url: str) -> dict[str, Any]:
    """The (EMR, x) points of a CSV table: columns ``emr`` and ``x`` (any case), optional ``state``, ``emr_std``.

    Raises
    ------
    InputError
        Missing file or columns, or values that are not numbers.
    """
    import pandas as pd

    if not storage.exists(url):
        raise InputError(f"no calibration table at {storage.redact(url)}; check the path")
    text = storage.read_bytes(url).decode(errors="replace")
    try:
        table = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{storage.redact(url)} is not a CSV table: {exc}") from exc
    cols = {str(c).strip().lower(): c for c in table.columns}
    missing = [c for c in ("emr", "x") if c not in cols]
    if missing:
        raise InputError(f"{storage.redact(url)} lacks the column(s) {', '.join(missing)}; it has "
                         f"{', '.join(map(str, table.columns)) or 'none'}. A calibration table has columns emr, x "
                         "(and optionally state, emr_std)")
    out: dict[str, Any] = {}
    for name in ("emr", "x", "emr_std"):
        if name in cols:
            values = pd.to_numeric(table[cols[name]], errors="coerce").to_numpy(dtype=float)
            if np.isnan(values).any():
                raise InputError(f"{storage.redact(url)}: column {name} has entries that are not numbers")
            out[name] = values
    if "state" in cols:
        out["labels"] = [str(v) for v in table[cols["state"]]]
    return out


def fit_table(url: str) -> Calibration:
    """:func:`fit` of the points of a CSV table (:func:`read_table`)."""
    t = read_table(url)
    return fit(t["emr"], t["x"], emr_std=t.get("emr_std"), labels=t.get("labels"))


def save(calibration: Calibration, url: str) -> str:
    """Write ``calibration`` as JSON (with provenance) to ``url``."""
    record = storage.provenance("xcs-calibration", None, **calibration.to_dict())
    storage.write_bytes(url, json.dumps(record, indent=2).encode())
    return url


def load(url: str) -> Calibration:
    """A calibration from its JSON (:func:`save`), or fitted from a CSV table of (emr, x) points.

    Raises
    ------
    InputError
        The file is neither, or its JSON lacks the fitted line.
    """
    if url.lower().endswith(".csv"):
        return fit_table(url)
    if not storage.exists(url):
        raise InputError(f"no calibration at {storage.redact(url)}; make one with `xrdscale xcs calibrate`")
    try:
        record = json.loads(storage.read_bytes(url).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{storage.redact(url)} is not a calibration (JSON from `xrdscale xcs calibrate`, "
                         f"or a CSV of emr, x): {exc}") from exc
    try:
        points = record["points"]
        return Calibration(slope=float(record["slope"]), intercept=float(record["intercept"]),
                           covariance=np.asarray(record["covariance"], dtype=np.float64), r2=float(record["r2"]),
                           residual_std=float(record["residual_std"]),
                           emr=tuple(float(p["emr"]) for p in points), x=tuple(float(p["x"]) for p in points),
                           labels=tuple(str(p.get("label", "")) for p in points) if any("label" in p for p in points)
                           else ())
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{storage.redact(url)} is not a calibration written by `xrdscale xcs calibrate` "
                         f"(missing or bad {exc})") from exc
