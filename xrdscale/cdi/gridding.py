"""Bragg CDI geometry: the scattering vector, detector-frame voxel sizes, and gridding onto an orthogonal q frame.

The geometry is kept to the common vertical-scattering rocking-curve case:

- laboratory frame of xrayutilities: the beam along +y, +z up, +x horizontal (perpendicular to the
  scattering plane y–z);
- the sample rocks about +x (perpendicular to the scattering plane) through angles
  ``ω_k = θ + (k - n//2) · Δω`` around the Bragg angle θ (``k`` the rocking index);
- the detector arm is at ``2θ`` about +x, at ``distance_m`` from the sample; detector rows run in the
  scattering plane (perpendicular to the exit beam), columns along +x; the central pixel
  ``(rows//2, cols//2)`` lies on the exit beam.

At the central voxel the scattering vector is ``Q = (0, 0, |Q|)`` in the sample frame,
``|Q| = 4π sin θ / λ`` (:func:`q_norm`). :func:`orthogonalize` computes ``Q`` of every voxel with
xrayutilities (``QConversion.area``) and bins the intensity onto a regular ``(q_z, q_y, q_x)`` grid of
the sample frame (axis 0 along the Bragg vector, axis 1 in the scattering plane, axis 2 perpendicular
to it) with ``FuzzyGridder3D``: every detector voxel is a box of its extent in q, split over the bins it
overlaps, and bins add (not average), so the total intensity is conserved.

>>> round(q_norm(13.5, 28.8) / 1e10, 2)
3.4
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: hc [keV·Å]: λ[Å] = HC_KEV_ANGSTROM / E[keV].
HC_KEV_ANGSTROM = 12.398419843320026


def _positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
                math.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a positive number, got {value!r}")


def _check_two_theta(two_theta_deg: float) -> None:
    _positive(two_theta_deg=two_theta_deg)
    if not two_theta_deg < 180:
        raise InputError(f"two_theta_deg must be in (0, 180) degrees, got {two_theta_deg}")


def wavelength_m(energy_kev: float) -> float:
    """The X-ray wavelength [m] at ``energy_kev``."""
    _positive(energy_kev=energy_kev)
    return HC_KEV_ANGSTROM / energy_kev * 1e-10


def q_norm(energy_kev: float, two_theta_deg: float) -> float:
    """The norm of the scattering vector ``|Q| = 4π sin θ / λ`` [m⁻¹].

    Parameters
    ----------
    energy_kev : float
        Photon energy [keV].
    two_theta_deg : float
        Scattering angle 2θ [deg], in (0, 180).

    Returns
    -------
    float
        ``|Q|`` in m⁻¹ (3.40e10 at 13.5 keV and 2θ = 28.8°).
    """
    _check_two_theta(two_theta_deg)
    return 4 * math.pi * math.sin(math.radians(two_theta_deg) / 2) / wavelength_m(energy_kev)


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        dims = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be 3 positive integers, got {shape!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"shape must be 3 positive integers, got {shape!r}")
    return dims[0], dims[1], dims[2]


def voxel_size_nm(shape: tuple[int, ...], *, energy_kev: float, two_theta_deg: float, distance_m: float,
                  pixel_um: float, rocking_step_deg: float) -> tuple[float, float, float]:
    """Real-space voxel size [nm] of a detector-frame pattern of ``shape`` (rocking, rows, cols).

    Along detector rows and columns ``λ D / (N p)``, along the rocking axis ``2π / (N |Q| Δω)``
    (Δω in radians): the field of view divided by the number of voxels.

    Parameters
    ----------
    shape : tuple of 3 int
        (rocking, rows, cols) of the pattern as phased.
    energy_kev, two_theta_deg : float
        Photon energy [keV] and scattering angle [deg].
    distance_m : float
        Sample–detector distance [m].
    pixel_um : float
        Detector pixel size [µm] (of the binned pixel when the data were binned).
    rocking_step_deg : float
        Rocking step [deg] (of the binned step when the data were binned).

    Returns
    -------
    tuple of 3 float
        Voxel size along (rocking, rows, cols) [nm].
    """
    n0, n1, n2 = _check_shape(shape)
    _positive(distance_m=distance_m, pixel_um=pixel_um, rocking_step_deg=rocking_step_deg)
    lam = wavelength_m(energy_kev)
    q = q_norm(energy_kev, two_theta_deg)
    pixel = pixel_um * 1e-6
    rocking = 2 * math.pi / (n0 * q * math.radians(rocking_step_deg))
    return rocking * 1e9, lam * distance_m / (n1 * pixel) * 1e9, lam * distance_m / (n2 * pixel) * 1e9


def detector_q(shape: tuple[int, int, int], *, energy_kev: float, two_theta_deg: float, distance_m: float,
               pixel_um: float, rocking_step_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q_z, q_y, q_x)`` [1/Å] of every voxel of a detector-frame pattern (sample frame, xrayutilities).

    Parameters
    ----------
    shape : tuple of 3 int
        (rocking, rows, cols).
    energy_kev, two_theta_deg, distance_m, pixel_um, rocking_step_deg : float
        As :func:`voxel_size_nm`.

    Returns
    -------
    tuple of 3 numpy.ndarray
        float64 arrays of ``shape``; ``q_z`` is along the Bragg vector at the central voxel.
    """
    from xrayutilities import experiment

    n0, n1, n2 = _check_shape(shape)
    _positive(distance_m=distance_m, pixel_um=pixel_um, rocking_step_deg=rocking_step_deg)
    _check_two_theta(two_theta_deg)
    qconv = experiment.QConversion(["x+"], ["x+"], [0, 1, 0], en=energy_kev * 1e3)
    # rows in the scattering plane (higher rows towards -z at 2θ = 0), columns along +x
    qconv.init_area("z-", "x+", cch1=n1 // 2, cch2=n2 // 2, Nch1=n1, Nch2=n2, distance=distance_m,
                    pwidth1=pixel_um * 1e-6, pwidth2=pixel_um * 1e-6)
    omega = two_theta_deg / 2 + (np.arange(n0) - n0 // 2) * rocking_step_deg
    qx, qy, qz = qconv.area(omega, two_theta_deg)
    return (np.asarray(qz).reshape(shape), np.asarray(qy).reshape(shape), np.asarray(qx).reshape(shape))


def orthogonalize(intensity: np.ndarray, *, energy_kev: float, two_theta_deg: float, distance_m: float,
                  pixel_um: float, rocking_step_deg: float,
                  shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Grid a detector-frame pattern (rocking, rows, cols) onto an orthogonal ``(q_z, q_y, q_x)`` frame.

    The grid is centred on the ``Q`` of the central voxel ``(n0//2, n1//2, n2//2)``, which lands on the
    grid's index ``m//2`` of each axis, with the spacing along each axis the smallest that keeps every
    detector voxel inside. Each detector voxel is a box of its extent along the q axes (the projections of
    its three edge vectors), split over the bins it overlaps (xrayutilities ``FuzzyGridder3D``, summed,
    not averaged): the total is conserved up to what falls outside the grid (nothing, by construction).

    Parameters
    ----------
    intensity : numpy.ndarray
        3D (rocking, rows, cols), finite.
    energy_kev, two_theta_deg, distance_m, pixel_um, rocking_step_deg : float
        As :func:`voxel_size_nm`.
    shape : tuple of 3 int, optional
        Shape of the output grid (default: the input's).

    Returns
    -------
    grid : numpy.ndarray
        float32 intensity on the orthogonal grid.
    spacing : tuple of 3 float
        q spacing of the grid along (q_z, q_y, q_x) [1/Å].

    Raises
    ------
    InputError
        Intensity not 3D or not finite; a non-positive geometry value; a bad output shape.
    """
    from xrayutilities import gridder3d

    data = np.asarray(intensity, dtype=np.float64)
    if data.ndim != 3:
        raise InputError(f"the intensity must be 3D (rocking, rows, cols), got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputError(f"the intensity has {int((~np.isfinite(data)).sum())} NaN/inf values; fix or mask them "
                         f"before gridding")
    out_shape = _check_shape(data.shape if shape is None else shape)
    if min(out_shape) < 2 or min(data.shape) < 2:
        raise InputError(f"gridding needs at least 2 voxels along every axis, got input {data.shape} and "
                         f"output {out_shape}")
    qs = detector_q(data.shape, energy_kev=energy_kev, two_theta_deg=two_theta_deg, distance_m=distance_m,
                    pixel_um=pixel_um, rocking_step_deg=rocking_step_deg)
    centre = tuple(n // 2 for n in data.shape)
    q0 = np.array([q[centre] for q in qs])
    # extent of one detector voxel along each q axis: the sum of |edge vector| projections
    edges = np.array([[np.take(q, c + 1, axis=a)[centre[:a] + centre[a + 1:]] - q[centre] for a, c in
                       enumerate(centre)] for q in qs])  # (q axis, detector axis)
    width = np.abs(edges).sum(axis=1)
    spacing = []
    lows = []
    for q, c0, w, m in zip(qs, q0, width, out_shape):
        below = c0 - q.min() + w / 2
        above = q.max() - c0 + w / 2
        d = max(below / (m // 2) if m // 2 else 0.0, above / (m - 1 - m // 2) if m - 1 - m // 2 else 0.0)
        d = d * (1 + 1e-9) + 1e-15
        spacing.append(d)
        lows.append(c0 - (m // 2) * d)
    grid = gridder3d.FuzzyGridder3D(*out_shape)
    grid.Normalize(False)
    # bin i spans [low + (i - 1/2) d, low + (i + 1/2) d]; dataRange takes the first and last bin centres
    grid.dataRange(lows[0], lows[0] + (out_shape[0] - 1) * spacing[0], lows[1],
                   lows[1] + (out_shape[1] - 1) * spacing[1], lows[2], lows[2] + (out_shape[2] - 1) * spacing[2])
    grid(qs[0], qs[1], qs[2], data, width=tuple(float(w) for w in width))
    result = np.asarray(grid.data, dtype=np.float32)
    logger.debug("gridded %s onto %s, q spacing %s 1/Å, total %.4g -> %.4g", data.shape, out_shape, spacing,
                 data.sum(), float(result.sum()))
    return result, (float(spacing[0]), float(spacing[1]), float(spacing[2]))
