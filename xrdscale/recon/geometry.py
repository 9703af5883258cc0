"""The parallel-beam geometry of a sinogram store, checked against the data contract.

Convention (ASTRA's, which the simulator's projections follow): the ray at angle θ and
translation ``t`` is the line ``x cos θ + y sin θ = t``; one translation step is one
pixel, so a reconstruction is the per-pixel density whose ray sums (in pixel-length
units) give the sinogram. Volumes are returned with ``y`` ascending (ASTRA's image rows
run from +y down, so rows are flipped once, here).

Off-centre grids. The volume is always ``n_det × n_det`` pixels of one step centred on
the rotation axis (:meth:`Geometry.pixel_coords`). The translation grid may be shifted
against it by :attr:`Geometry.offset` steps (bin ``i`` at
``t = (i − (n_det − 1)/2 + offset) · step``): scikit-image's ``radon`` grid, an even
number of bins with the axis *on* bin ``n_det // 2``, has ``offset = −1/2``. The engines
reconstruct such grids exactly with a shifted detector (ASTRA's ``parallel_vec``
geometry, detector centre moved by ``offset`` bins along the detector), never by
resampling the sinogram.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: the angular span (degrees) a sinogram must cover, as a fraction of 180°
MIN_COVERAGE = 0.98

#: grid offsets (steps) below this are rounding: the grid counts as centred (offset 0)
OFFSET_TOLERANCE = 1e-3

#: largest offset of the grid centre from the rotation axis, as a fraction of the grid
#: width: the axis must lie in the central half of the translation range, so that at
#: least half of the field of view is seen from every angle
MAX_OFFSET_FRACTION = 0.25


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
    offset : float
        Position of the centre of the translation grid relative to the rotation axis, in
        steps: bin ``i`` is at ``(i − (n_det − 1)/2 + offset) · step_mm``. 0 for a grid
        centred on the axis, −0.5 for an even grid with the axis on bin ``n_det // 2``.
    """

    angles_deg: tuple[float, ...]
    n_det: int
    step_mm: float = 1.0
    offset: float = 0.0

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
        return Geometry(tuple(float(a) for a in angles), self.n_det, self.step_mm, self.offset)

    def pixel_coords(self) -> np.ndarray:
        """Pixel centres in mm (the same for ``x`` and ``y``), centred on the rotation axis."""
        return (np.arange(self.n_det) - (self.n_det - 1) / 2.0) * self.step_mm

    def detector_coords(self) -> np.ndarray:
        """Translation of every detector bin in steps from the rotation axis (``offset`` included)."""
        return np.arange(self.n_det) - (self.n_det - 1) / 2.0 + self.offset

    def translation_coords(self) -> np.ndarray:
        """Translation of every detector bin in mm, rotation axis at 0."""
        return self.detector_coords() * self.step_mm


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
        spaced, or a grid whose centre is more than :data:`MAX_OFFSET_FRACTION` of its
        width off the rotation axis. A smaller offset is kept in ``Geometry.offset`` (and
        logged at INFO) and reconstructed exactly.
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
    n = int(translation.size)
    offset = float(np.mean(translation)) / step
    if abs(offset) > MAX_OFFSET_FRACTION * n:
        raise InputError(f"{what}: the translation grid is centred {offset:.2f} steps ({offset * step:.4g} mm) "
                         f"off the rotation axis, more than {MAX_OFFSET_FRACTION:g} of its width ({n} steps): "
                         "too little of the object is seen from every angle to reconstruct it; check that "
                         "translation 0 is the rotation axis, or run the sinogram stage with center=auto")
    if abs(offset) < OFFSET_TOLERANCE:
        offset = 0.0
    else:
        logger.info("%s: the translation grid is centred %.4g steps (%.4g mm) off the rotation axis; "
                    "reconstructing with a detector shifted by that much, the volume centred on the axis",
                    what, offset, offset * step)
    return Geometry(tuple(float(a) for a in angle), n, step, offset)
