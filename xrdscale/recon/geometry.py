"""The parallel-beam geometry of a sinogram store, checked against the data contract.

Convention (ASTRA's, which the simulator's projections follow): the ray at angle θ and
translation ``t`` is the line ``x cos θ + y sin θ = t``; one translation step is one
pixel, so a reconstruction is the per-pixel density whose ray sums (in pixel-length
units) give the sinogram. Volumes are returned with ``y`` ascending (ASTRA's image rows
run from +y down, so rows are flipped once, here).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: the angular span (degrees) a sinogram must cover, as a fraction of 180°
MIN_COVERAGE = 0.98


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Parallel-beam geometry shared by every channel of one sinogram.

    Attributes
    ----------
    angles_deg : tuple of float
        Projection angles in degrees, ascending in [0, 180).
    n_det : int
        Number of translation steps (detector bins); the volume is ``n_det × n_det``.
    step_mm : float
        Translation step in mm (the pixel size of the volume).
    """

    angles_deg: tuple[float, ...]
    n_det: int
    step_mm: float = 1.0

    @property
    def n_angles(self) -> int:
        """Number of projections."""
        return len(self.angles_deg)

    @property
    def angles_rad(self) -> np.ndarray:
        """Projection angles in radians."""
        return np.deg2rad(np.asarray(self.angles_deg, dtype=np.float64))

    def subset(self, index: np.ndarray) -> "Geometry":
        """The geometry of the projections ``index`` only."""
        angles = np.asarray(self.angles_deg)[np.asarray(index)]
        return Geometry(tuple(float(a) for a in angles), self.n_det, self.step_mm)

    def pixel_coords(self) -> np.ndarray:
        """Pixel centres in mm (the same for ``x`` and ``y``), centred on the rotation axis."""
        return (np.arange(self.n_det) - (self.n_det - 1) / 2.0) * self.step_mm


def geometry_from_coords(angle: np.ndarray, translation: np.ndarray, *, what: str = "sinogram") -> Geometry:
    """Check the ``angle`` and ``translation`` coordinates of a sinogram and build its geometry.

    Parameters
    ----------
    angle : numpy.ndarray
        Projection angles in degrees.
    translation : numpy.ndarray
        Translation positions in mm, rotation axis at 0.
    what : str
        Name of the data, for error messages.

    Returns
    -------
    Geometry

    Raises
    ------
    InputError
        Angles not ascending in [0, 180) or not covering 180°, translations not evenly
        spaced or not centred on the rotation axis.
    """
    angle = np.asarray(angle, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    if angle.size < 2 or translation.size < 2:
        raise InputError(f"{what} has {angle.size} angles and {translation.size} translations; "
                         "a tomogram needs at least 2 of each")
    if np.any(np.diff(angle) <= 0) or angle[0] < 0 or angle[-1] >= 180:
        raise InputError(f"{what}: angles must be strictly ascending in [0, 180) degrees, got "
                         f"{angle[0]:.3f} … {angle[-1]:.3f}; build the sinogram with `xrdscale sinogram`")
    coverage = angle[-1] - angle[0] + float(np.median(np.diff(angle)))
    if coverage < MIN_COVERAGE * 180.0:
        raise InputError(f"{what}: angles cover {coverage:.1f}° but parallel-beam tomography needs 180° "
                         f"(at least {MIN_COVERAGE * 180:.1f}°); check the rotation_angle positioner or "
                         "acquire the missing projections")
    steps = np.diff(translation)
    step = float(np.median(steps))
    if step <= 0 or np.max(np.abs(steps - step)) > 0.01 * step:
        raise InputError(f"{what}: translations must be ascending and evenly spaced, got steps "
                         f"{steps.min():.6g} … {steps.max():.6g} mm; resample the sinogram on a regular grid")
    offset = float(np.mean(translation)) / step
    if abs(offset) > 0.05:
        raise InputError(f"{what}: the translation grid is not centred on the rotation axis (its mean is "
                         f"{offset:.2f} steps off 0); run the sinogram stage with center=auto or crop the "
                         "sinogram symmetrically about the axis")
    return Geometry(tuple(float(a) for a in angle), int(translation.size), step)
