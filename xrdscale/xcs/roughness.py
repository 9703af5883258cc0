"""Segmentation of a reconstructed coin cell, its buried interfaces and their roughness.

The cell is a stack along ``z`` (the rotation axis, axis 0 of a ``(z, y, x)`` volume):
Li-metal anode, a thin solid polymer electrolyte (SPE) membrane and the composite
cathode, in air. At 115 keV the attenuation increases air < Li < SPE < cathode, so a
four-class multi-Otsu threshold (:func:`segment`) labels the voxels
``0 air, 1 anode, 2 spe, 3 cathode`` (:data:`COMPONENTS`).

Interface heights (:func:`interface_height`). For every ``(y, x)`` column the label
change from the lower to the upper material locates the interface to a voxel; it is then
refined to sub-voxel precision on the attenuation profile itself. Heights are in voxel
index units of ``z`` with voxel ``k`` centred at ``z = k`` and covering ``[k − ½, k + ½]``,
so a flat interface at height ``h`` leaves the fraction ``h − (k − ½)`` of voxel ``k``
below it (the partial-volume convention of :mod:`xrdscale.xcs.phantom`). Two refinements:

- ``"area"`` (default): with ``μ_l``, ``μ_u`` the attenuation levels of the two
  materials and ``k, k + 1`` the voxels straddling the midpoint crossing, the fraction of
  each voxel filled by the lower material is ``f = clip((μ_u − μ) / (μ_u − μ_l), 0, 1)``
  and ``h = k − ½ + f_k + f_{k+1}``: exact for a partial-volume step wherever the
  interface lies (FBP is slice by slice, so nothing blurs along ``z``), and unbiased for
  noise.
- ``"linear"``: the linear interpolation of the midpoint crossing between the voxel
  centres, ``h = k + (m − μ_k) / (μ_{k+1} − μ_k)``; exact for interfaces at integer and
  half-integer heights, biased by up to ≈ 0.09 voxel in between.

Roughness (:func:`roughness_ra`, :func:`roughness_rq`) follows ISO 4287 / ISO 25178 (the
paper's Eq. 6): ``R_a = (1/A) ∬ |Z(x, y)| dx dy`` with ``Z`` the height after removing the
least-squares mean plane, optionally after the ISO 16610 Gaussian filter of cut-off
wavelength ``λc`` (the roughness is ``Z`` minus its Gaussian-smoothed waviness, weighting
function ``s(x) = 1/(αλc) exp(−π (x/(αλc))²)``, ``α = √(ln 2/π)``, applied separably along
``x`` and ``y`` and normalised over the finite points of the map, so holes and edges do not
bias it). Heights are in voxels and are multiplied by the voxel size ``pixel_size``
(cubic voxels): ``R_a`` comes out in the units of ``pixel_size``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import ndimage

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: the component of every label value, in order of increasing attenuation
COMPONENTS = ("air", "anode", "spe", "cathode")

#: ISO 16610-21 Gaussian filter constant α = √(ln 2 / π)
ISO_ALPHA = float(np.sqrt(np.log(2.0) / np.pi))

#: at most this many voxels feed the multi-Otsu histogram (a strided subsample above)
OTSU_SAMPLE = 2_000_000

INTERFACES = ("anode/spe", "cathode/spe")


def _check_volume(volume: np.ndarray, what: str = "volume") -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"the {what} must be 3D (z, y, x), got shape {volume.shape}")
    if not np.issubdtype(volume.dtype, np.number) or np.iscomplexobj(volume):
        raise InputError(f"the {what} must be real numbers, got dtype {volume.dtype}")
    return volume


def segment(volume: np.ndarray, *, classes: int = 4, thresholds: Any = None, smooth: bool = True,
            cleanup: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Label the voxels of a reconstructed cell by attenuation: air, anode, SPE, cathode.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(z, y, x)`` attenuation volume.
    classes : int
        Number of classes; 4 for :data:`COMPONENTS`.
    thresholds : sequence of float, optional
        ``classes − 1`` increasing attenuation thresholds; multi-Otsu
        (:func:`skimage.filters.threshold_multiotsu`, on a strided subsample of at most
        :data:`OTSU_SAMPLE` voxels) when omitted.
    smooth : bool
        Threshold a laterally median-filtered copy (3 × 3 in ``y, x``, nothing along ``z``,
        so thin layers keep their thickness) instead of the raw volume.
    cleanup : bool
        Replace isolated voxels by the majority label of their 3 × 3 × 3 neighbourhood
        (layers two or more voxels thick are kept).

    Returns
    -------
    labels : numpy.ndarray
        ``(z, y, x)`` int8 labels ``0 … classes − 1`` ordered by attenuation.
    thresholds : numpy.ndarray
        The ``classes − 1`` thresholds used.

    Raises
    ------
    InputError
        A volume that is not 3D, non-finite, too uniform to split, or thresholds that are
        not ``classes − 1`` increasing numbers.
    """
    from skimage.filters import threshold_multiotsu

    volume = _check_volume(volume)
    if not 2 <= classes <= 127:
        raise InputError(f"classes must be between 2 and 127, got {classes}")
    work = np.asarray(volume, dtype=np.float32)
    if not np.all(np.isfinite(work)):
        raise InputError("the volume has NaN or infinite voxels; reconstruct again or mask them to 0 first")
    if smooth:
        work = ndimage.median_filter(work, size=(1, 3, 3), mode="nearest")
    if thresholds is None:
        flat = work.ravel()
        sample = flat[:: max(1, flat.size // OTSU_SAMPLE)]
        if float(np.ptp(sample)) <= 0:
            raise InputError("the volume is uniform: nothing to segment; check the reconstruction")
        try:
            th = np.asarray(threshold_multiotsu(sample, classes=classes), dtype=np.float64)
        except ValueError as exc:
            raise InputError(f"multi-Otsu cannot split the volume into {classes} classes ({exc}); give "
                             "thresholds= explicitly") from exc
    else:
        th = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if th.size != classes - 1 or np.any(np.diff(th) <= 0) or not np.all(np.isfinite(th)):
            raise InputError(f"thresholds must be {classes - 1} increasing finite numbers for {classes} classes, "
                             f"got {th.tolist()}")
    labels = np.digitize(work, th).astype(np.int8)
    if cleanup:
        labels = _majority(labels, classes)
    logger.info("segmented %s voxels into %d classes at thresholds %s", "×".join(map(str, volume.shape)), classes,
                ", ".join(f"{t:.4g}" for t in th))
    return labels, th


def _majority(labels: np.ndarray, classes: int) -> np.ndarray:
    """The most frequent label of every 3 × 3 × 3 neighbourhood (ties keep the voxel's own)."""
    best = np.zeros(labels.shape, dtype=np.float32)
    out = labels.copy()
    for c in range(classes):
        count = ndimage.uniform_filter((labels == c).astype(np.float32), size=3, mode="nearest")
        count += np.where(labels == c, 1e-3, 0.0).astype(np.float32)  # ties: keep the voxel's own label
        better = count > best
        out[better] = c
        best = np.maximum(best, count)
    return out


def class_levels(volume: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], *, axis: int = 0) -> np.ndarray:
    """Median attenuation of each class, over its voxels whose two neighbours along ``axis`` share its label.

    Leaving out the voxels next to a label change leaves out the partial-volume voxels of
    the interfaces, so the levels are those of the pure materials.
    """
    v = np.moveaxis(np.asarray(volume), axis, 0)
    lab = np.moveaxis(np.asarray(labels), axis, 0)
    interior = np.zeros(lab.shape, dtype=bool)
    interior[1:-1] = (lab[1:-1] == lab[:-2]) & (lab[1:-1] == lab[2:])
    levels = []
    for c in classes:
        sel = interior & (lab == c)
        if not np.any(sel):
            sel = lab == c
        if not np.any(sel):
            raise InputError(f"no voxel carries label {c} ({_name(c)}); check the segmentation or its thresholds")
        levels.append(float(np.median(v[sel])))
    return np.asarray(levels)


def _name(label: int) -> str:
    return COMPONENTS[label] if 0 <= label < len(COMPONENTS) else str(label)


def interface_height(volume: np.ndarray, labels: np.ndarray, lower: int, upper: int, *, axis: int = 0,
                     thresholds: Any = None, levels: tuple[float, float] | None = None,
                     threshold: float | None = None, method: str = "area") -> np.ndarray:
    """Sub-voxel height of the interface from material ``lower`` to ``upper`` in every column.

    For each column along ``axis`` the interface is first placed at the first voxel
    labelled ``upper`` that has a ``lower`` voxel somewhere below it, then refined on the
    attenuation profile: the crossing of the midpoint ``threshold`` nearest to the label
    change (within two voxels) is found and refined with ``method`` (see the module
    docstring). Vectorised over columns: the only Python loop is over a few ``z`` offsets.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(z, y, x)`` attenuation volume (the raw reconstruction, not a smoothed copy).
    labels : numpy.ndarray
        Labels of the same shape (:func:`segment`).
    lower, upper : int
        Label of the material below and above the interface (e.g. 1 and 2 for
        anode → SPE in a cell whose anode is at the bottom).
    axis : int
        The stacking axis (0: ``z`` of a ``(z, y, x)`` volume).
    thresholds : sequence of float, optional
        The segmentation's class thresholds (:func:`segment`); given, and ``threshold``
        not, the crossing level is the threshold between the two classes
        (``thresholds[min(lower, upper)]`` for adjacent classes). The ``area`` refinement
        hardly depends on the crossing level (any two-voxel window holding the interface
        gives the same height); ``linear`` does.
    levels : (float, float), optional
        Attenuation of the pure ``lower`` and ``upper`` materials; the medians of their
        interior voxels (:func:`class_levels`) by default.
    threshold : float, optional
        The crossing level; by default the one of ``thresholds``, else the midpoint of
        ``levels``.
    method : {"area", "linear"}
        Sub-voxel refinement.

    Returns
    -------
    numpy.ndarray
        Heights (float64, voxel index units along ``axis``) of the other two axes' shape;
        NaN where the column does not show the interface (all NaN where one of the two
        materials is absent, e.g. in a tile of air).
    """
    volume = _check_volume(volume)
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise InputError(f"labels {labels.shape} and volume {volume.shape} must have the same shape")
    if method not in ("area", "linear"):
        raise InputError(f"unknown interface method {method!r}; expected 'area' or 'linear'")
    if lower == upper:
        raise InputError(f"lower and upper must be different labels, got {lower} twice")
    nan_map = np.full(np.delete(np.asarray(volume.shape), axis % volume.ndim), np.nan)
    if levels is None:
        if not (np.any(labels == lower) and np.any(labels == upper)):
            return nan_map
        lev = class_levels(volume, labels, (lower, upper), axis=axis)
        mu_l, mu_u = float(lev[0]), float(lev[1])
    else:
        mu_l, mu_u = float(levels[0]), float(levels[1])
    if mu_u == mu_l:
        raise InputError(f"the {_name(lower)} and {_name(upper)} levels are equal ({mu_l:.4g}): no contrast to "
                         "locate an interface; check the segmentation")
    if threshold is None and thresholds is not None and abs(lower - upper) == 1:
        th = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if min(lower, upper) < th.size:
            threshold = float(th[min(lower, upper)])
    mid = 0.5 * (mu_l + mu_u) if threshold is None else float(threshold)
    sign = 1.0 if mu_u > mu_l else -1.0
    v = np.moveaxis(volume, axis, 0).astype(np.float64) * sign   # increasing across the interface
    lab = np.moveaxis(labels, axis, 0)
    mid_s, lo_s, up_s = mid * sign, mu_l * sign, mu_u * sign
    nz = v.shape[0]
    if nz < 2:
        raise InputError(f"the stacking axis has {nz} voxel(s); an interface needs at least 2")
    # label change: first `upper` voxel with a `lower` voxel below it
    seen_lower = np.maximum.accumulate(lab == lower, axis=0)
    below = np.zeros_like(seen_lower)
    below[1:] = seen_lower[:-1]
    cand = (lab == upper) & below
    found = cand.any(axis=0)
    t = np.argmax(cand, axis=0)                        # first upper voxel (0 where none)
    # midpoint crossings v[k] < mid <= v[k+1] for k in t-3 … t+1, the one nearest to t - 1/2
    best_k = np.full(t.shape, -1, dtype=np.int64)
    best_d = np.full(t.shape, np.inf)
    cols = np.indices(t.shape)
    for d in (-1, -2, 0, -3, 1):                       # nearest first: ties keep the closer offset
        k = t + d
        ok = (k >= 0) & (k + 1 < nz)
        kc = np.clip(k, 0, nz - 2)
        vk = v[(kc, *cols)]
        vk1 = v[(kc + 1, *cols)]
        cross = ok & (vk < mid_s) & (vk1 >= mid_s)
        dist = abs(d + 0.5)
        take = cross & (dist < best_d)
        best_k = np.where(take, kc, best_k)
        best_d = np.where(take, dist, best_d)
    has_cross = best_k >= 0
    k = np.where(has_cross, best_k, np.clip(t - 1, 0, nz - 2))
    vk = v[(k, *cols)]
    vk1 = v[(k + 1, *cols)]
    if method == "area":
        def frac(x: np.ndarray) -> np.ndarray:
            return np.clip((up_s - x) / (up_s - lo_s), 0.0, 1.0)
        h = k - 0.5 + frac(vk) + frac(vk1)
    else:
        step = vk1 - vk
        h = k + np.where(step > 0, (mid_s - vk) / np.where(step > 0, step, 1.0), 0.5)
    h = np.where(found & has_cross, h, np.where(found, t - 0.5, np.nan))
    n_found = int(found.sum())
    logger.debug("interface %s → %s: %d of %d columns (%d without a midpoint crossing)", _name(lower),
                 _name(upper), n_found, found.size, int((found & ~has_cross).sum()))
    return h.astype(np.float64)


def _coords(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.indices(shape, dtype=np.float64)
    return xx, yy


def _valid(z: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    valid = np.isfinite(z)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != z.shape:
            raise InputError(f"the mask has shape {mask.shape}, the height map {z.shape}; they must match")
        valid &= mask
    return valid


def _check_map(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise InputError(f"a height map must be 2D (y, x), got shape {z.shape}")
    return z


def mean_plane(Z: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Least-squares mean plane ``a + b·x + c·y`` of the finite points of a height map.

    Parameters
    ----------
    Z : numpy.ndarray
        ``(y, x)`` heights; NaN where unknown.
    mask : numpy.ndarray, optional
        ``(y, x)`` bool: the points to fit (finite ones only in any case).

    Returns
    -------
    numpy.ndarray
        The plane on the whole ``(y, x)`` grid (pixel index coordinates).

    Raises
    ------
    InputError
        Fewer than 3 usable points, or points on one line.
    """
    z = _check_map(Z)
    valid = _valid(z, mask)
    xx, yy = _coords(z.shape)
    if int(valid.sum()) < 3:
        raise InputError(f"the height map has {int(valid.sum())} usable points; a mean plane needs at least 3 "
                         "(check the mask and that the interface was found)")
    a = np.stack([np.ones(int(valid.sum())), xx[valid], yy[valid]], axis=1)
    coef, _, rank, _ = np.linalg.lstsq(a, z[valid], rcond=None)
    if rank < 3:
        raise InputError("the usable points of the height map lie on one line; a mean plane needs a 2D region")
    return coef[0] + coef[1] * xx + coef[2] * yy


def gaussian_waviness(Z: np.ndarray, cutoff_px: float, *, mask: np.ndarray | None = None) -> np.ndarray:
    """ISO 16610 Gaussian low-pass (the waviness) of a height map, normalised over its finite points.

    Parameters
    ----------
    Z : numpy.ndarray
        ``(y, x)`` heights; NaN where unknown.
    cutoff_px : float
        Cut-off wavelength ``λc`` in pixels; the weighting function
        ``s(x) = 1/(αλc) exp(−π (x/(αλc))²)`` is a Gaussian of ``σ = αλc/√(2π)``; it
        transmits 50 % of the amplitude at ``λ = λc``.
    mask : numpy.ndarray, optional
        Points to use (finite ones only in any case).

    Returns
    -------
    numpy.ndarray
        The smoothed map (NaN where no usable point lies within the filter's reach).
    """
    z = _check_map(Z)
    if not cutoff_px > 0:
        raise InputError(f"the cut-off wavelength must be positive, got {cutoff_px}")
    valid = _valid(z, mask)
    sigma = ISO_ALPHA * float(cutoff_px) / np.sqrt(2.0 * np.pi)
    w = valid.astype(np.float64)
    num = ndimage.gaussian_filter(np.where(valid, z, 0.0), sigma, mode="constant", cval=0.0, truncate=4.0)
    den = ndimage.gaussian_filter(w, sigma, mode="constant", cval=0.0, truncate=4.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), np.nan)


def roughness_profile(Z: np.ndarray, *, pixel_size: float = 1.0, cutoff: float | None = None,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """The roughness map: heights minus the mean plane (minus the Gaussian waviness if ``cutoff``).

    Parameters
    ----------
    Z : numpy.ndarray
        ``(y, x)`` heights in voxels; NaN where unknown.
    pixel_size : float
        Voxel size (cubic voxels); the result is in its units.
    cutoff : float, optional
        ISO 16610 cut-off wavelength ``λc`` in the units of ``pixel_size``.
    mask : numpy.ndarray, optional
        ``(y, x)`` points to use.

    Returns
    -------
    numpy.ndarray
        Roughness in the units of ``pixel_size``; NaN outside the usable points.
    """
    z = _check_map(Z)
    if not pixel_size > 0:
        raise InputError(f"pixel_size must be positive, got {pixel_size}")
    valid = _valid(z, mask)
    r = np.where(valid, z - mean_plane(z, mask=valid), np.nan)
    if cutoff is not None:
        r = r - gaussian_waviness(r, float(cutoff) / float(pixel_size), mask=valid)
    return r * float(pixel_size)


def roughness_ra(Z: np.ndarray, *, pixel_size: float = 1.0, cutoff: float | None = None,
                 mask: np.ndarray | None = None) -> float:
    """Arithmetic mean roughness ``R_a = (1/A) ∬ |Z| dx dy`` (Eq. 6, ISO 4287 / 25178 ``S_a``).

    Parameters
    ----------
    Z : numpy.ndarray
        ``(y, x)`` heights in voxels; NaN where unknown (left out).
    pixel_size : float
        Voxel size (cubic voxels): heights are multiplied by it, ``R_a`` is in its units.
    cutoff : float, optional
        ISO 16610 Gaussian cut-off wavelength ``λc`` in the units of ``pixel_size``; without
        it only the least-squares mean plane is removed.
    mask : numpy.ndarray, optional
        ``(y, x)`` bool: the area ``A`` (finite points only in any case).

    Returns
    -------
    float

    Examples
    --------
    A sinusoid of amplitude 2 has ``R_a = 2A/π`` (up to its sampling):

    >>> x = np.arange(480.0)
    >>> z = np.tile(2.0 * np.sin(2 * np.pi * x / 48.0), (8, 1))
    >>> bool(abs(roughness_ra(z) - 4 / np.pi) < 0.01)
    True
    """
    r = roughness_profile(Z, pixel_size=pixel_size, cutoff=cutoff, mask=mask)
    return float(np.nanmean(np.abs(r)))


def roughness_rq(Z: np.ndarray, *, pixel_size: float = 1.0, cutoff: float | None = None,
                 mask: np.ndarray | None = None) -> float:
    """Root-mean-square roughness ``R_q`` (ISO 4287 / 25178 ``S_q``); arguments as :func:`roughness_ra`."""
    r = roughness_profile(Z, pixel_size=pixel_size, cutoff=cutoff, mask=mask)
    return float(np.sqrt(np.nanmean(r * r)))


def volume_fractions(labels: np.ndarray, *, mask: np.ndarray | None = None) -> dict[str, float]:
    """Fraction of the voxels of each component (:data:`COMPONENTS`).

    Parameters
    ----------
    labels : numpy.ndarray
        ``(z, y, x)`` labels (:func:`segment`).
    mask : numpy.ndarray, optional
        ``(z, y, x)`` voxels or ``(y, x)`` columns to count (air included); without it the
        fractions are of the cell's voxels (air excluded, its fraction 0).

    Returns
    -------
    dict
        ``component → fraction``, summing to 1.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise InputError(f"labels must be 3D (z, y, x), got shape {lab.shape}")
    if mask is None:
        sel = lab != 0
    else:
        m = np.asarray(mask, dtype=bool)
        if m.shape == lab.shape[1:]:
            m = np.broadcast_to(m, lab.shape)
        if m.shape != lab.shape:
            raise InputError(f"the mask has shape {m.shape}; expected the labels' {lab.shape} or their columns' "
                             f"{lab.shape[1:]}")
        sel = m
    total = int(sel.sum())
    if total == 0:
        raise InputError("no voxel to count: the labels are all air or the mask is empty")
    counts = np.bincount(lab[sel].astype(np.int64).ravel(), minlength=len(COMPONENTS))
    return {name: float(counts[i]) / total for i, name in enumerate(COMPONENTS)}


def analyse_volume(volume: np.ndarray, *, voxel_um: float = 1.0, cutoff_um: float | None = None,
                   roi: tuple[int, int, int, int] | None = None, thresholds: Any = None,
                   method: str = "area") -> dict[str, Any]:
    """Segment a cell, map its two buried interfaces and measure their roughness and the fractions.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(z, y, x)`` reconstruction, ``z`` the stacking (rotation) axis.
    voxel_um : float
        Voxel size in µm.
    cutoff_um : float, optional
        ISO 16610 cut-off wavelength in µm (none: only the mean plane is removed).
    roi : (y0, y1, x0, x1), optional
        Lateral region of interest (e.g. away from the cell's rim); the whole field by default.
    thresholds : sequence of 3 floats, optional
        Segmentation thresholds (multi-Otsu by default).
    method : {"area", "linear"}
        Sub-voxel refinement of :func:`interface_height`.

    Returns
    -------
    dict
        ``labels`` (of the ROI), ``thresholds``, ``order`` (``"anode-bottom"`` or
        ``"anode-top"``: which way up the stack is), ``height`` (``"anode/spe"``,
        ``"cathode/spe"`` → ``(y, x)`` map in voxels, ROI only), ``ra_um``, ``rq_um`` (µm),
        ``fractions`` (of the cell's voxels in the ROI).
    """
    volume = _check_volume(volume)
    # segment the whole field (its air and rim included: multi-Otsu needs all four classes), then crop
    labels, th = segment(volume, classes=len(COMPONENTS), thresholds=thresholds)
    if roi is not None:
        if len(roi) != 4:
            raise InputError(f"roi must be (y0, y1, x0, x1), got {roi!r}")
        y0, y1, x0, x1 = (int(v) for v in roi)
        if not (0 <= y0 < y1 <= volume.shape[1] and 0 <= x0 < x1 <= volume.shape[2]):
            raise InputError(f"roi {roi!r} is empty or outside the lateral field {volume.shape[1:]} (y, x)")
        volume = volume[:, y0:y1, x0:x1]
        labels = labels[:, y0:y1, x0:x1]
    z = np.arange(labels.shape[0], dtype=np.float64)[:, None, None]
    present = [int(np.count_nonzero(labels == c)) for c in (1, 2, 3)]
    if min(present) == 0:
        missing = [COMPONENTS[c] for c, n in zip((1, 2, 3), present, strict=True) if n == 0]
        raise InputError(f"the segmentation found no {', '.join(missing)} voxel; check the thresholds "
                         f"({', '.join(f'{t:.4g}' for t in th)}) and the region of interest")
    z_anode = float(np.mean(np.broadcast_to(z, labels.shape)[labels == 1]))
    z_cathode = float(np.mean(np.broadcast_to(z, labels.shape)[labels == 3]))
    bottom = z_anode < z_cathode
    pairs = {"anode/spe": (1, 2), "cathode/spe": (2, 3)} if bottom else {"anode/spe": (2, 1), "cathode/spe": (3, 2)}
    heights = {name: interface_height(volume, labels, lo, up, method=method) for name, (lo, up) in pairs.items()}
    ra = {name: roughness_ra(h, pixel_size=voxel_um, cutoff=cutoff_um) for name, h in heights.items()}
    rq = {name: roughness_rq(h, pixel_size=voxel_um, cutoff=cutoff_um) for name, h in heights.items()}
    fractions = volume_fractions(labels)
    logger.info("interfaces: %s", "; ".join(f"{n} R_a {ra[n]:.4g} µm R_q {rq[n]:.4g} µm" for n in heights))
    return {"labels": labels, "thresholds": th, "order": "anode-bottom" if bottom else "anode-top",
            "height": heights, "ra_um": ra, "rq_um": rq, "fractions": fractions}
