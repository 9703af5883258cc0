"""Post-processing of a Bragg CDI reconstruction: centring, twin, registration, phase ramp, displacement, strain.

Everything here is numpy in, numpy out, on (Z, Y, X) arrays in the convention of
:mod:`xrdscale.cdi.fourier` (origin at index ``n // 2``). A reconstruction is defined only
up to a translation, a global phase, a linear phase ramp (a shift of the Bragg peak) and the
twin (:func:`xrdscale.cdi.fourier.twin`); :func:`align` fixes all four, against a reference
when there is one, and :func:`phase_rms_error` measures what is left against a known truth.

Phase gradients are taken from ``e^{iφ}`` (never from the wrapped phase), so phase wraps do
not break them: along an axis ``∂φ/∂x = arg(e^{iφ(x+1)} · e^{−iφ(x−1)}) / 2`` (central), or
the one-sided ``arg(e^{iφ(x+1)} · e^{−iφ(x)})`` at the edge of the support. This is
``Im(conj(e^{iφ}) ∇e^{iφ})`` to first order and exact for a linear phase of up to π/2 rad per
voxel (π at the edges).

Units: ``q_norm`` = |Q| = 4π sin θ / λ in 1/m, voxel sizes in m, displacement in m, strain
dimensionless. The sign convention is ``φ = |Q| u`` (``u = φ / |Q|``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xrdscale.cdi import fourier
from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: without a support, :func:`align` uses the voxels whose amplitude exceeds this fraction of the maximum
SUPPORT_FRACTION = 0.2
#: sub-voxel precision of :func:`register`: 1 / this voxel
UPSAMPLE = 20

AXES = (0, 1, 2)


def _obj(obj: Any, what: str = "object") -> np.ndarray:
    x = np.asarray(obj)
    if x.ndim != 3:
        raise InputError(f"the {what} must be a 3D array (Z, Y, X); got shape {x.shape}")
    return x


def _support(support: Any, shape: tuple[int, ...], what: str = "support") -> np.ndarray:
    s = np.asarray(support)
    if s.shape != shape:
        raise InputError(f"the {what} has shape {s.shape} but the object has shape {shape}; "
                         f"pass a boolean array of the object's shape")
    s = s.astype(bool)
    if not s.any():
        raise InputError(f"the {what} is empty")
    return s


def _same_shape(obj: np.ndarray, reference: np.ndarray) -> np.ndarray:
    ref = _obj(reference, "reference")
    if ref.shape != obj.shape:
        raise InputError(f"the reference has shape {ref.shape} but the object has shape {obj.shape}; "
                         f"compare objects of the same shape")
    return ref


def _shift_support(support: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return np.asarray(fourier.fourier_shift(support.astype(np.float64), shift).real > 0.5)


def centre_of_mass(obj: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """The centre of mass (voxels, per axis) of ``|obj|`` (inside ``support`` if given)."""
    w = np.abs(_obj(obj)).astype(np.float64)
    if support is not None:
        w = w * _support(support, w.shape)
    total = w.sum()
    if total <= 0:
        raise InputError("the object is zero (inside its support); it has no centre of mass")
    return np.array([(w.sum(axis=tuple(a for a in AXES if a != axis)) * np.arange(n)).sum() / total
                     for axis, n in enumerate(w.shape)])


def centring_roll(obj: np.ndarray, support: np.ndarray | None = None) -> tuple[int, int, int]:
    """The whole-voxel roll that brings the amplitude's centre of mass nearest to the array centre."""
    com = centre_of_mass(obj, support)
    r = [int(np.rint(n // 2 - c)) for n, c in zip(np.shape(obj), com, strict=True)]
    return r[0], r[1], r[2]


def centre(obj: np.ndarray, support: np.ndarray | None = None, *,
           subvoxel: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Move the object so that its amplitude's centre of mass is at the array centre (index ``n // 2``).

    Parameters
    ----------
    obj : numpy.ndarray
        Complex (Z, Y, X).
    support : numpy.ndarray of bool, optional
        Where the centre of mass is taken; moved with the object.
    subvoxel : bool
        Also the sub-voxel remainder, by a Fourier shift (else a whole-voxel roll only).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray or None)
        The moved object and support.
    """
    x = _obj(obj)
    sup = None if support is None else _support(support, x.shape)
    com = centre_of_mass(x, sup)
    shift = np.array([n // 2 for n in x.shape], dtype=float) - com
    if not subvoxel:
        shift = np.rint(shift)
    moved = fourier.fourier_shift(x, shift)
    return moved, (None if sup is None else _shift_support(sup, shift))


def phase_ramp(obj: np.ndarray, support: np.ndarray, *, reference: np.ndarray | None = None) -> np.ndarray:
    """The linear phase ramp (rad per voxel, per axis) of ``obj`` (or of ``obj · conj(reference)``) in the support.

    The amplitude-weighted mean phase difference of neighbouring voxels inside the support,
    ``arg Σ z(x+1) conj(z(x))``: robust to wraps, to noise and to phase jumps (domain walls);
    exact for a pure ramp of up to π per voxel.
    """
    x = _obj(obj).astype(np.complex128)
    sup = _support(support, x.shape)
    if reference is not None:
        x = x * np.conj(_same_shape(x, reference))
    g = np.zeros(3)
    for axis in AXES:
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis] = slice(1, None)
        lo[axis] = slice(None, -1)
        pair = sup[tuple(hi)] & sup[tuple(lo)]
        total = np.sum((x[tuple(hi)] * np.conj(x[tuple(lo)]))[pair])
        g[axis] = float(np.angle(total)) if total != 0 else 0.0
    return g


def _ramp(shape: tuple[int, ...], g: np.ndarray) -> np.ndarray:
    phase = np.zeros(shape)
    for axis, n in enumerate(shape):
        view = [1, 1, 1]
        view[axis] = n
        phase = phase + g[axis] * (np.arange(n) - n // 2).reshape(view)
    return phase


def remove_ramp(obj: np.ndarray, support: np.ndarray, *, reference: np.ndarray | None = None) -> np.ndarray:
    """``obj`` without its linear phase ramp (:func:`phase_ramp`; relative to ``reference`` if given).

    The ramp is removed about the array centre, so the phase there is unchanged.
    """
    x = _obj(obj)
    g = phase_ramp(x, support, reference=reference)
    out = x * np.exp(-1j * _ramp(x.shape, g))
    return out.astype(np.complex128 if x.dtype == np.complex128 else np.complex64)


def zero_mean_phase(obj: np.ndarray, support: np.ndarray, *, reference: np.ndarray | None = None) -> np.ndarray:
    """``obj · exp(−i · angle(Σ obj))`` over the support (``Σ obj · conj(reference)`` with a reference)."""
    x = _obj(obj)
    sup = _support(support, x.shape)
    z = x.astype(np.complex128)
    if reference is not None:
        z = z * np.conj(_same_shape(x, reference))
    total = np.sum(z[sup])
    out = x * np.exp(-1j * np.angle(total)) if total != 0 else x
    return out.astype(np.complex128 if x.dtype == np.complex128 else np.complex64)


def register(obj: np.ndarray, reference: np.ndarray, *, upsample: int = UPSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Shift ``obj`` (sub-voxel, by a Fourier shift) onto the reference.

    Two steps of :func:`skimage.registration.phase_cross_correlation` (plain cross
    correlation, upsampled ``upsample`` times): of the amplitudes (robust to any phase), then
    a refinement by the complex correlation after removing the relative phase ramp (exact for
    an object that differs from the reference by a shift, a ramp and a global phase; amplitude
    correlation alone is biased by the ringing of sharp edges). A refinement of more than a
    voxel is not trusted and left out.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The shifted object and the shift applied (voxels per axis; ``out[i + shift] = obj[i]``).
    """
    from skimage.registration import phase_cross_correlation

    x = _obj(obj)
    ref = _same_shape(x, reference)
    coarse, _, _ = phase_cross_correlation(np.abs(ref).astype(np.float64), np.abs(x).astype(np.float64),
                                           upsample_factor=upsample, normalization=None)
    shift = np.asarray(coarse, dtype=float)
    moved = fourier.fourier_shift(x, shift)
    amp = np.abs(ref)
    sup = amp > SUPPORT_FRACTION * amp.max()
    flat = remove_ramp(moved, sup, reference=ref) if sup.any() else moved
    fine, _, _ = phase_cross_correlation(ref.astype(np.complex128), flat.astype(np.complex128),
                                         upsample_factor=upsample, normalization=None)
    fine = np.asarray(fine, dtype=float)
    if np.all(np.abs(fine) <= 1.0) and np.any(fine != 0):
        shift = shift + fine
        moved = fourier.fourier_shift(x, shift)
    return moved, shift


def _twin_candidate(obj: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The twin, rolled (whole voxels) to keep the object's centre of mass; and that roll."""
    t = fourier.twin(obj)
    before = centre_of_mass(obj)
    after = centre_of_mass(t)
    r = [int(v) for v in np.rint(before - after)]
    roll = (r[0], r[1], r[2])
    return np.roll(t, roll, axis=AXES), roll


def _match(obj: np.ndarray, reference: np.ndarray) -> float:
    """How well ``obj`` matches the reference: |normalized complex correlation| after registration and ramp."""
    moved, _ = register(obj, reference)
    amp = np.abs(reference)
    sup = amp > SUPPORT_FRACTION * amp.max()
    flat = remove_ramp(moved, sup, reference=reference).astype(np.complex128)
    num = abs(np.sum(flat * np.conj(reference)))
    den = np.sqrt(np.sum(np.abs(flat) ** 2) * np.sum(np.abs(reference) ** 2))
    return float(num / den) if den > 0 else 0.0


def resolve_twin(obj: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, bool]:
    """``obj`` or its twin, whichever matches the reference better; and whether it is the twin.

    The twin (:func:`xrdscale.cdi.fourier.twin`) is re-centred on the object's centre of
    mass. "Matches better" is the larger normalized complex cross-correlation with the
    reference after sub-voxel registration of the amplitudes and removal of the relative
    phase ramp: the amplitudes' overlap and, for a centro-symmetric crystal whose twin has
    the same amplitude, the phase.
    """
    x = _obj(obj)
    ref = _same_shape(x, reference)
    t, _ = _twin_candidate(x)
    if _match(t, ref) > _match(x, ref):
        return t.astype(x.dtype, copy=False), True
    return x, False


def align(obj: np.ndarray, reference: np.ndarray | None = None,
          support: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full alignment chain: centre, twin and registration (with a reference), phase ramp, zero mean phase.

    Parameters
    ----------
    obj : numpy.ndarray
        Complex (Z, Y, X).
    reference : numpy.ndarray, optional
        An object to align to (another start, a truth): then the twin is resolved against it,
        the object registered onto it, and the phase ramp and global phase are taken
        relative to it (``obj · conj(reference)``); without one they are the object's own.
    support : numpy.ndarray of bool, optional
        The object's support (moved with it); default: ``|obj| > SUPPORT_FRACTION · max``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The aligned object (complex64) and its support.
    """
    x = _obj(obj).astype(np.complex64)
    sup = (np.abs(x) > SUPPORT_FRACTION * np.abs(x).max()) if support is None else _support(support, x.shape)
    moved, sup_c = centre(x, sup)
    x, sup = moved, (sup if sup_c is None else sup_c)
    if not sup.any():
        raise InputError("the support is empty after centring the object")
    if reference is not None:
        ref = _same_shape(x, reference)
        x, is_twin = resolve_twin(x, ref)
        if is_twin:
            t = fourier.twin(sup.astype(np.float64)).real > 0.5
            _, roll = _twin_candidate(moved)
            sup = np.roll(t, roll, axis=AXES)
        x, shift = register(x, ref)
        sup = _shift_support(sup, shift)
        if not sup.any():
            raise InputError("the support is empty after registering the object to the reference")
        x = remove_ramp(x, sup, reference=ref)
        x = zero_mean_phase(x, sup, reference=ref)
    else:
        x = remove_ramp(x, sup)
        x = zero_mean_phase(x, sup)
    return x.astype(np.complex64), sup.astype(bool)


def displacement(phase: np.ndarray, q_norm: float) -> np.ndarray:
    """The displacement along Q, ``u = φ / |Q|`` (m), of a phase ``φ`` (rad) and ``q_norm`` = |Q| (1/m)."""
    if not q_norm > 0:
        raise InputError(f"q_norm (|Q|, 1/m) must be positive; got {q_norm}")
    return np.asarray(phase, dtype=np.float64) / float(q_norm)


def _derivative(z: np.ndarray, sup: np.ndarray, axis: int) -> np.ndarray:
    """∂φ/∂(index) along ``axis`` from the unit phasor ``z``, inside ``sup`` (NaN where no neighbour is)."""
    pad = [(0, 0)] * 3
    pad[axis] = (1, 1)
    zp = np.pad(z, pad)
    sp = np.pad(sup, pad)
    n = z.shape[axis]

    def take(arr: np.ndarray, start: int) -> np.ndarray:
        sl = [slice(None)] * 3
        sl[axis] = slice(start, start + n)
        return arr[tuple(sl)]

    z_lo, z_mid, z_hi = take(zp, 0), take(zp, 1), take(zp, 2)
    s_lo, s_hi = take(sp, 0), take(sp, 2)
    central = np.angle(z_hi * np.conj(z_lo)) / 2
    forward = np.angle(z_hi * np.conj(z_mid))
    backward = np.angle(z_mid * np.conj(z_lo))
    out = np.where(s_lo & s_hi, central, np.where(s_hi, forward, np.where(s_lo, backward, np.nan)))
    return np.where(sup, out, np.nan)


def strain(obj: np.ndarray, support: np.ndarray, *, voxel_size_m: tuple[float, float, float],
           q_direction: tuple[float, float, float] = (0.0, 0.0, 1.0), q_norm: float) -> np.ndarray:
    """The strain along Q, ``ε = (1/|Q|) ∂φ/∂x_Q``, of a reconstruction; NaN outside the support.

    Parameters
    ----------
    obj : numpy.ndarray
        Complex (Z, Y, X) object; its phase ``φ`` is used through ``e^{iφ}`` (wrap-free,
        see the module doc), central differences inside the support and one-sided ones at
        its edge.
    support : numpy.ndarray of bool
        Where the strain is computed.
    voxel_size_m : (float, float, float)
        Voxel size along axes 0, 1, 2 (m).
    q_direction : (float, float, float)
        Direction of Q in the array's axes (0, 1, 2) (normalized here); default: axis 2.
    q_norm : float
        |Q| (1/m).

    Returns
    -------
    numpy.ndarray
        float64 (Z, Y, X), dimensionless; NaN outside the support.
    """
    x = _obj(obj)
    sup = _support(support, x.shape)
    d = np.asarray(q_direction, dtype=float)
    v = np.asarray(voxel_size_m, dtype=float)
    if d.shape != (3,) or not np.all(np.isfinite(d)) or np.linalg.norm(d) == 0:
        raise InputError(f"q_direction must be a non-zero 3-vector (axes 0, 1, 2); got {q_direction}")
    if v.shape != (3,) or not np.all(v > 0):
        raise InputError(f"voxel_size_m must be three positive sizes in m; got {voxel_size_m}")
    if not q_norm > 0:
        raise InputError(f"q_norm (|Q|, 1/m) must be positive; got {q_norm}")
    d = d / np.linalg.norm(d)
    amp = np.abs(x)
    z = np.where(amp > 0, x / np.where(amp > 0, amp, 1), 0).astype(np.complex128)
    grad = np.zeros(x.shape)
    for axis in AXES:
        if d[axis] != 0:
            grad = grad + d[axis] * _derivative(z, sup, axis) / v[axis]
    return np.where(sup, grad / float(q_norm), np.nan)


def phase_rms_error(recovered: np.ndarray, truth: np.ndarray, support: np.ndarray, *,
                    weighted: bool = False) -> float:
    """RMS phase difference (rad, wrapped to (−π, π]) inside the truth's support, after alignment.

    The recovered object is first made as like the truth as its ambiguities allow: twin
    (:func:`resolve_twin`), sub-voxel shift (:func:`register`), then the relative phase
    ramp and the global phase (of ``recovered · conj(truth)`` in the support) are removed.

    Parameters
    ----------
    recovered, truth : numpy.ndarray
        Complex (Z, Y, X) objects.
    support : numpy.ndarray of bool
        The truth's support: where the phase difference counts.
    weighted : bool
        Weight every voxel by ``|recovered| · |truth|`` (voxels where the reconstruction has
        no amplitude, and hence no defined phase, then hardly count); default: every voxel of
        the support counts the same.
    """
    x = _obj(recovered, "recovered object")
    ref = _same_shape(x, truth)
    sup = _support(support, x.shape, "truth support")
    x, _ = resolve_twin(x, ref)
    x, _ = register(x, ref)
    x = remove_ramp(x, sup, reference=ref)
    x = zero_mean_phase(x, sup, reference=ref)
    z = x.astype(np.complex128) * np.conj(ref)
    d = np.angle(z)[sup]
    w = np.abs(z)[sup] if weighted else np.ones(d.shape)
    if w.sum() <= 0:
        raise InputError("the recovered object is zero inside the truth's support; there is no phase to compare")
    return float(np.sqrt(np.sum(w * d ** 2) / w.sum()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """The Dice coefficient ``2|a ∩ b| / (|a| + |b|)`` of two boolean arrays (1 when both are empty)."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise InputError(f"dice: the arrays have shapes {x.shape} and {y.shape}; pass two of the same shape")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int(np.sum(x & y)) / total
