"""Series analysis of Bragg CDI reconstructions across charge states (the paper's Eqs. 2–4, Table 1).

The reconstructions of all states are first brought into one frame with one support
(:mod:`xrdscale.cdi.post`), and their global phases relative to the first state are set
by the unchanged bulk (:func:`bulk_offsets`: a global phase is not measured). The phase
differences to the first state,
Δφ_i = arg(ρ_i · conj(ρ_0)) on the common support, are stacked as the rows of an
(S, N) matrix D (S states, N support voxels). The covariance of Eq. 2,
C = Σ_i Δφ_i ⊗ Δφ_i = Dᵀ D, is N × N and never formed: its eigenvectors are the right
singular vectors of D, its eigenvalues the squared singular values. Then

- ψ₁, the principal component, is the first right singular vector, with the sign that
  makes Σ_i Ω_i ≥ 0 (the states move along +ψ₁ on average);
- Ω_i = ψ₁ · Δφ_i (Eq. 3), the order parameter of state i (Ω_0 = 0);
- Φ_i = Δφ_i − ψ₁ (Eq. 4 as printed), the map of the regions that drive the PCA.

Table 1 per state: χ² of its reconstruction (Eq. 1), the mean phase difference to the
first state (degrees), the mean relative displacement ⟨Δφ⟩/|Q| (Å) and the mean relative
strain along Q, ⟨ε_i − ε_0⟩ (from the gradient of exp(iΔφ)).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: Table 1 columns, in order
TABLE_COLUMNS = ("state", "chi2", "dphi_mean_deg", "displacement_mean_angstrom", "strain_mean", "omega")


@dataclass(frozen=True)
class PCAResult:
    """The principal component analysis of a series' phase differences.

    Attributes
    ----------
    component : numpy.ndarray
        ψ₁ (N,), unit norm, over the support voxels.
    eigenvalues : numpy.ndarray
        λ_j (S,) of C = Σ Δφ_i ⊗ Δφ_i, largest first.
    omega : numpy.ndarray
        Ω_i = ψ₁ · Δφ_i (S,).
    phi : numpy.ndarray
        Φ_i = Δφ_i − ψ₁ (S, N).
    explained : float
        λ₁ / Σ λ_j, the fraction of the total phase variation along ψ₁.
    """

    component: np.ndarray
    eigenvalues: np.ndarray
    omega: np.ndarray
    phi: np.ndarray
    explained: float


def common_support(supports: Sequence[np.ndarray], *, fraction: float = 0.5) -> np.ndarray:
    """The voxels inside the (aligned) supports of at least ``fraction`` of the states.

    Parameters
    ----------
    supports : sequence of numpy.ndarray
        Boolean supports of one shape.
    fraction : float
        Majority needed; 1.0 is the intersection.

    Returns
    -------
    numpy.ndarray
        Boolean common support.

    Raises
    ------
    InputError
        No supports, different shapes, or an empty common support.
    """
    if not supports:
        raise InputError("a series needs at least one reconstruction; none was given")
    shapes = {np.shape(s) for s in supports}
    if len(shapes) > 1:
        raise InputError(f"the supports of a series have different shapes {sorted(shapes)}; align them first")
    votes = np.mean([np.asarray(s, dtype=bool) for s in supports], axis=0)
    common = votes >= fraction - 1e-9
    if not common.any():
        raise InputError("the states' supports have no voxel in common: the reconstructions are not aligned "
                         "(or are of different crystals)")
    return common


def bulk_offsets(objects: Sequence[np.ndarray], support: np.ndarray, *, reference: int = 0,
                 bins: int = 90) -> np.ndarray:
    """The global phase of every state relative to the reference, taken from the unchanged bulk.

    A reconstruction's global phase is not measured, so the phase offset between two states
    must be fixed by a convention. The mean phase difference would be zero by construction;
    instead the most common difference (the mode of the histogram of arg(ρ_i · conj(ρ_ref))
    over the common support, ``bins`` bins, circularly smoothed) is taken as the offset:
    the part of the crystal whose lattice did not change then has Δφ = 0, and a domain
    that changed keeps its full phase difference (and a non-zero mean).

    Returns
    -------
    numpy.ndarray
        (S,) offsets in radians (0 for the reference).
    """
    ref = np.asarray(objects[reference])[support]
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    out = np.zeros(len(objects))
    for i, o in enumerate(objects):
        if i == reference:
            continue
        d = np.angle(np.asarray(o)[support] * np.conj(ref))
        hist, _ = np.histogram(d, bins=edges)
        smooth = sum(np.roll(hist, k) * w for k, w in ((-2, 1), (-1, 2), (0, 3), (1, 2), (2, 1)))
        out[i] = centres[int(np.argmax(smooth))]
        near = np.abs(np.angle(np.exp(1j * (d - out[i])))) < 2 * np.pi / bins * 2  # refine within the peak
        if near.any():
            out[i] = float(np.angle(np.exp(1j * d[near]).mean()))
    return out


def phase_differences(objects: Sequence[np.ndarray], support: np.ndarray, *, reference: int = 0) -> np.ndarray:
    """Δφ_i = arg(ρ_i · conj(ρ_ref)) on the support voxels, as an (S, N) matrix (radians, wrapped).

    Taking the argument of the product, not φ_i − φ_0, keeps every difference in (−π, π].
    The objects' global phases are used as given (see :func:`bulk_offsets`).
    """
    shapes = {np.shape(o) for o in objects}
    if len(shapes) > 1:
        raise InputError(f"the reconstructions of a series have different shapes {sorted(shapes)}")
    if np.shape(support) != next(iter(shapes)):
        raise InputError(f"the support's shape {np.shape(support)} is not the reconstructions' {next(iter(shapes))}")
    ref = np.asarray(objects[reference])[support]
    return np.stack([np.angle(np.asarray(o)[support] * np.conj(ref)) for o in objects]).astype(np.float64)


def pca(dphi: np.ndarray) -> PCAResult:
    """PCA of stacked phase differences by the SVD of the (S, N) matrix (Eqs. 2–4).

    Parameters
    ----------
    dphi : numpy.ndarray
        (S, N) phase differences, row i = Δφ_i.

    Returns
    -------
    PCAResult

    Raises
    ------
    InputError
        Not a 2-D matrix, non-finite values, or no variation at all.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> pattern = rng.normal(size=500)
    >>> a = np.array([0.0, 0.5, 1.0, 0.2])
    >>> result = pca(a[:, None] * pattern[None, :])
    >>> bool(np.allclose(result.omega / np.linalg.norm(pattern), a))
    True
    """
    d = np.asarray(dphi, dtype=np.float64)
    if d.ndim != 2:
        raise InputError(f"phase differences must be an (states, voxels) matrix; got shape {d.shape}")
    if not np.isfinite(d).all():
        raise InputError("phase differences contain NaN or inf; compute them on the common support only")
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    if s.size == 0 or s[0] <= 0:
        raise InputError("the states' phases do not differ at all: there is no principal component")
    psi = vt[0]
    omega = d @ psi
    if omega.sum() < 0:
        psi, omega = -psi, -omega
    eig = s**2
    return PCAResult(component=psi, eigenvalues=eig, omega=omega, phi=d - psi[None, :],
                     explained=float(eig[0] / eig.sum()))


def table(*, labels: Sequence[str], chi2: Sequence[float], dphi: np.ndarray, q_norm: float,
          strain: np.ndarray | None = None, omega: np.ndarray | None = None) -> pd.DataFrame:
    """Table 1 of the paper per state.

    Parameters
    ----------
    labels : sequence of str
        State labels (e.g. ``2.5V-charge``).
    chi2 : sequence of float
        χ² (Eq. 1) of every state's reconstruction.
    dphi : numpy.ndarray
        (S, N) phase differences to the first state on the common support.
    q_norm : float
        |Q| in m⁻¹.
    strain : numpy.ndarray, optional
        (S, N) strain along Q of every state on the common support; the mean relative
        strain is ⟨ε_i − ε_0⟩ (NaN where not given).
    omega : numpy.ndarray, optional
        Ω_i of the PCA.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`.
    """
    mean_dphi = np.asarray(dphi).mean(axis=1)
    rows = {
        "state": list(labels),
        "chi2": np.asarray(chi2, dtype=float),
        "dphi_mean_deg": np.degrees(mean_dphi),
        "displacement_mean_angstrom": mean_dphi / q_norm * 1e10,
        "strain_mean": (np.nanmean(strain - strain[:1], axis=1) if strain is not None
                        else np.full(len(labels), np.nan)),
        "omega": np.asarray(omega, dtype=float) if omega is not None else np.full(len(labels), np.nan),
    }
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
