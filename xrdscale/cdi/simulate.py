"""Simulated Bragg CDI data: faceted crystals, displacement phase, noisy Bragg intensity, charge-state series.

Every array follows the FFT convention of :mod:`xrdscale.cdi`: the object's origin is at index
``n // 2`` of each axis and the far field is ``fftshift(fftn(ifftshift(obj), norm="ortho"))`` over the
last three axes, so the Bragg peak is at the array centre.

A crystal (:func:`crystal_support`) is a convex polytope (a hexagonal prism, a cuboid or ``N``
random facets) scaled so that it spans at most half of the array along every axis: the pattern is
oversampled at least twice in every direction. Its phase (:func:`displacement_phase`, radians, the
projection of the displacement on the scattering vector) is a sum of smooth domains, a
dislocation-like vortex and a surface strain shell. :func:`simulate_series` gives the states of one
crystal whose phase changes by ``a_i · pattern`` (a localized surface domain) from state to state,
each state with its own Poisson noise.

Everything is vectorised numpy (loops run over facets or domains, never over voxels); 32³ to 128³
arrays take well under a second to a few seconds.

>>> crystal = simulate_crystal((32, 32, 32), photons=1e6, seed=1)
>>> crystal.obj.dtype, crystal.intensity.shape, bool(crystal.support[16, 16, 16])
(dtype('complex64'), (32, 32, 32), True)
"""

from __future__ import annotations

import itertools
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: Phase kinds of :func:`displacement_phase`.
PHASE_KINDS = ("domains", "vortex", "shell", "none")
#: Named facet sets of :func:`crystal_support`.
FACETS = ("hexagonal", "box")
#: Total of the noise-free intensity when ``photons`` is None.
DEFAULT_PHOTONS = 1e7
#: Coefficients ``a_i`` of the default charge-state series (interpolated for other lengths).
DEFAULT_COEFFICIENTS = (0.0, 0.4, 0.8, 1.0, 0.7, 0.3)
#: Peak of the series' phase-change pattern [rad] at coefficient 1.
PATTERN_AMPLITUDE = 1.5
#: Most random facets of ``facets=N``.
MAX_FACETS = 64


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
        integral = all(int(s) == s for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be 3 integers >= 8, got {shape!r}") from None
    if len(dims) != 3 or not integral or min(dims) < 8:
        raise InputError(f"shape must be 3 integers >= 8, got {shape!r}")
    return dims[0], dims[1], dims[2]


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return np.random.default_rng() if rng is None else rng


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Open grid of voxel coordinates with the origin at ``n // 2`` of each axis (float32)."""
    return [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) - (n // 2)
            for i, n in enumerate(shape)]


def _facet_normals(facets: str | int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit-scale polytope: outward normals (k, 3) and distances (k,), containing the origin."""
    if isinstance(facets, str):
        if facets == "box":
            normals = np.concatenate([np.eye(3), -np.eye(3)])
            return normals, np.ones(6)
        if facets == "hexagonal":
            # prism axis along axis 0; side facets in the (1, 2) plane, hexagon vertices at radius 1
            angles = np.arange(6) * np.pi / 3
            sides = np.stack([np.zeros(6), np.cos(angles), np.sin(angles)], axis=1)
            normals = np.concatenate([np.array([[1.0, 0, 0], [-1.0, 0, 0]]), sides])
            return normals, np.concatenate([np.ones(2), np.full(6, np.cos(np.pi / 6))])
        raise InputError(f"unknown facets {facets!r}: use one of {', '.join(FACETS)} or a number of random facets "
                         f"(4 to {MAX_FACETS})")
    if isinstance(facets, bool) or not isinstance(facets, (int, np.integer)) or not 4 <= facets <= MAX_FACETS:
        raise InputError(f"facets must be one of {', '.join(FACETS)} or an integer from 4 to {MAX_FACETS}, "
                         f"got {facets!r}")
    for _ in range(100):
        normals = _spread(rng.normal(size=(int(facets), 3)))
        try:
            hull = ConvexHull(normals)
        except QhullError:  # pragma: no cover - spread points are never degenerate
            continue
        # bounded polytope <=> the origin lies strictly inside the hull of the normals
        if np.all(hull.equations[:, -1] < -0.05):
            return normals, rng.uniform(0.9, 1.1, size=int(facets))
    raise InputError(f"could not draw {facets} facet normals that close a crystal; use more facets")  # pragma: no cover


def _spread(points: np.ndarray, iterations: int = 60) -> np.ndarray:
    """Random directions pushed apart on the unit sphere (Coulomb repulsion): a rounded, bounded crystal."""
    pts = points / np.linalg.norm(points, axis=1, keepdims=True)
    step = 0.5 / len(pts)
    for _ in range(iterations):
        diff = pts[:, None, :] - pts[None, :, :]
        dist3 = np.sum(diff**2, axis=-1) ** 1.5 + np.eye(len(pts))
        pts = pts + step * np.sum(diff / dist3[..., None], axis=1)
        pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    return pts


def _vertices(normals: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Vertices of the bounded polytope ``normals · x <= dist`` (every feasible triple intersection)."""
    triples = np.array(list(itertools.combinations(range(len(normals)), 3)))
    a = normals[triples]
    b = dist[triples]
    det = np.linalg.det(a)
    ok = np.abs(det) > 1e-9
    pts = np.linalg.solve(a[ok], b[ok][..., None])[..., 0]
    feasible = np.all(pts @ normals.T <= dist + 1e-7, axis=1)
    return pts[feasible]


def crystal_support(shape: tuple[int, int, int], *, size: float = 0.35,
                    aspect: tuple[float, float, float] = (1.0, 0.85, 0.8), facets: str | int = "hexagonal",
                    rotation: np.ndarray | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """A faceted convex crystal centred in an array of ``shape``.

    The crystal is the intersection of half-spaces on the voxel grid (origin at ``n // 2``): a unit
    polytope, stretched by ``aspect`` along the array axes, rotated by ``rotation``, then scaled so
    that its extent along every axis ``i`` is at most ``size * shape[i]``, with equality along the
    relatively longest axis (for a cube: ``size`` is the extent along the longest axis as a fraction
    of the array side). Its bounding box is centred on ``n // 2``.

    Parameters
    ----------
    shape : tuple of 3 int
        Array shape, each side >= 8.
    size : float
        Extent along the longest axis as a fraction of the array side, ``0 < size <= 0.5`` so that the
        pattern is oversampled at least twice in every direction.
    aspect : tuple of 3 float
        Relative extents along the three axes (positive).
    facets : {"hexagonal", "box"} or int
        ``"hexagonal"``: hexagonal prism along axis 0 (6 side facets + 2 basal facets); ``"box"``: a
        cuboid; an integer ``N`` (4 to 64): ``N`` random facet normals drawn with ``rng`` at random
        distances (0.9–1.1); the normals are spread apart on the sphere (a rounded crystal without
        spikes).
    rotation : numpy.ndarray, optional
        3×3 rotation matrix applied after ``aspect``.
    rng : numpy.random.Generator, optional
        Random generator for random facets (default: a fresh unseeded one).

    Returns
    -------
    numpy.ndarray
        Boolean support of ``shape``.

    Raises
    ------
    InputError
        A bad shape, size, aspect, facets or rotation.
    """
    dims = _check_shape(shape)
    if not 0 < size <= 0.5:
        raise InputError(f"size must be in (0, 0.5] (extent as a fraction of the array side; above 0.5 the pattern "
                         f"is not oversampled twice), got {size}")
    asp = np.asarray(aspect, dtype=float)
    if asp.shape != (3,) or not np.all(np.isfinite(asp)) or np.any(asp <= 0):
        raise InputError(f"aspect must be 3 positive numbers, got {aspect!r}")
    rot = np.eye(3)
    if rotation is not None:
        rot = np.asarray(rotation, dtype=float)
        if rot.shape != (3, 3) or not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6):
            raise InputError(f"rotation must be a 3x3 orthogonal matrix, got {np.asarray(rotation).tolist()}")
    normals, dist = _facet_normals(facets, _rng(rng))
    # x = R diag(a) u  =>  n·u <= d  <=>  (R diag(1/a) n)·x <= d
    tnormals = normals / asp @ rot.T
    verts = _vertices(normals, dist) * asp @ rot.T
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    scale = size * min(n / (h - low) for n, h, low in zip(dims, hi, lo))
    centre = (lo + hi) / 2 * scale
    coords = [c - np.float32(c0) for c, c0 in zip(_grid(dims), centre)]
    inside = np.ones(dims, dtype=bool)
    for nrm, d in zip(tnormals.astype(np.float32), dist * scale):
        inside &= nrm[0] * coords[0] + nrm[1] * coords[1] + nrm[2] * coords[2] <= np.float32(d + 1e-4)
    if not inside.any():
        raise InputError(f"size {size} gives an empty crystal in a {dims} array; use a larger size")
    return inside


def _support_frame(support: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Grid coordinates, the support's centroid and its largest bounding-box extent (voxels)."""
    coords = _grid(support.shape)
    idx = np.nonzero(support)
    centroid = np.array([i.mean() - n // 2 for i, n in zip(idx, support.shape)])
    extent = max(float(i.max() - i.min() + 1) for i in idx)
    return coords, centroid, extent


def _domains(support: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    coords, _, extent = _support_frame(support)
    inside = np.argwhere(support)
    phase = np.zeros(support.shape, dtype=np.float32)
    n_domains = int(rng.integers(2, 5))
    for _ in range(n_domains):
        centre = inside[rng.integers(len(inside))] - np.array(support.shape) // 2
        radius = rng.uniform(0.2, 0.45) * extent
        width = max(1.5, 0.08 * extent)
        r = np.sqrt(sum((c - np.float32(c0)) ** 2 for c, c0 in zip(coords, centre)))
        offset = rng.uniform(0.4, 1.0) * rng.choice([-1.0, 1.0])
        phase += np.float32(offset) * 0.5 * (1 - np.tanh((r - np.float32(radius)) / np.float32(width)))
    # a smooth long-range gradient on top of the domains
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    phase += sum(np.float32(g / extent * 0.5) * c for g, c in zip(direction, coords))
    phase -= phase[support].mean()
    peak = np.abs(phase[support]).max()
    return phase * np.float32(amplitude / peak) if peak > 0 else phase


def _vortex(support: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    coords, centroid, extent = _support_frame(support)
    line = rng.normal(size=3)
    line /= np.linalg.norm(line)
    # two unit vectors perpendicular to the line
    helper = np.eye(3)[np.argmin(np.abs(line))]
    e1 = np.cross(line, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(line, e1)
    through = centroid + rng.uniform(-0.1, 0.1, size=3) * extent
    rel = [c - np.float32(p) for c, p in zip(coords, through)]
    u = sum(np.float32(a) * r for a, r in zip(e1, rel))
    v = sum(np.float32(a) * r for a, r in zip(e2, rel))
    return np.arctan2(v, u).astype(np.float32)


def _shell(support: np.ndarray, amplitude: float) -> np.ndarray:
    depth = ndimage.distance_transform_edt(np.pad(support, 1)).astype(np.float32)[1:-1, 1:-1, 1:-1]
    _, _, extent = _support_frame(support)
    decay = max(1.5, 0.08 * extent)
    return (np.float32(amplitude) * np.exp(-(depth - 1) / np.float32(decay))).astype(np.float32)


def displacement_phase(support: np.ndarray, *, kinds: Sequence[str] = ("domains",), amplitude: float = 1.0,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """A displacement phase field on a support: the sum of the phases of ``kinds``.

    Parameters
    ----------
    support : numpy.ndarray
        Boolean 3D support (not empty).
    kinds : sequence of str
        Any of

        - ``"domains"``: 2–4 smooth domains (tanh-bounded balls of random phase offset around random
          support voxels) plus a weak linear gradient, zero mean on the support, peak ``|phase|`` =
          ``amplitude``;
        - ``"vortex"``: a dislocation-like vortex, ``atan2`` around a random line through (near) the
          crystal's centroid, a wrap of 2π around the line (in (-π, π], not scaled by ``amplitude``);
        - ``"shell"``: a surface strain shell, ``amplitude · exp(-(depth - 1) / λ)`` with ``depth``
          the Euclidean distance to the outside (1 on the surface voxels) and ``λ`` = 8 % of the
          crystal's extent (at least 1.5 voxels);
        - ``"none"``: zero.
    amplitude : float
        Peak phase [rad] of ``"domains"`` and ``"shell"``.
    rng : numpy.random.Generator, optional
        Random generator (default: a fresh unseeded one).

    Returns
    -------
    numpy.ndarray
        float32 phase [rad] of the support's shape, 0 outside the support; the sum is not wrapped.

    Raises
    ------
    InputError
        An unknown kind, a support that is not 3D or empty.
    """
    support = np.asarray(support, dtype=bool)
    if support.ndim != 3 or not support.any():
        raise InputError(f"support must be a non-empty 3D array, got shape {support.shape} with "
                         f"{int(support.sum())} voxels inside")
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in PHASE_KINDS]
    if unknown:
        raise InputError(f"unknown phase kind(s) {', '.join(map(repr, unknown))}: use any of {', '.join(PHASE_KINDS)}")
    gen = _rng(rng)
    phase = np.zeros(support.shape, dtype=np.float32)
    for kind in kinds:
        if kind == "domains":
            phase += _domains(support, amplitude, gen)
        elif kind == "vortex":
            phase += _vortex(support, gen)
        elif kind == "shell":
            phase += _shell(support, amplitude)
    phase[~support] = 0
    return phase


def bragg_intensity(obj: np.ndarray, *, photons: float | None = 1e7,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """The Bragg intensity ``|F|²`` of an object, scaled to a total and with Poisson noise.

    ``F = fftshift(fftn(ifftshift(obj), norm="ortho"))`` over the last three axes; leading axes
    are a batch of objects, each scaled on its own.

    Parameters
    ----------
    obj : numpy.ndarray
        Complex object(s), ``(..., z, y, x)``.
    photons : float or None
        Expected total of each pattern; with Poisson noise when given. ``None``: the noise-free
        intensity, scaled to a total of ``DEFAULT_PHOTONS`` (1e7).
    rng : numpy.random.Generator, optional
        Random generator of the noise (default: a fresh unseeded one).

    Returns
    -------
    numpy.ndarray
        float32 intensity of ``obj``'s shape (integer counts when ``photons`` is given).

    Raises
    ------
    InputError
        Fewer than 3 dimensions, an object of zero amplitude, or ``photons`` not positive.
    """
    obj = np.asarray(obj)
    if obj.ndim < 3:
        raise InputError(f"the object must have at least 3 dimensions, got shape {obj.shape}")
    if photons is not None and not (np.isfinite(photons) and photons > 0):
        raise InputError(f"photons must be positive (or None for noise-free intensity), got {photons}")
    axes = (-3, -2, -1)
    field = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(obj, axes=axes), axes=axes, norm="ortho"), axes=axes)
    intensity = field.real.astype(np.float64) ** 2 + field.imag.astype(np.float64) ** 2
    total = intensity.sum(axis=axes, keepdims=True)
    if np.any(total <= 0):
        raise InputError("the object has zero amplitude everywhere: there is no intensity to scale")
    intensity *= (DEFAULT_PHOTONS if photons is None else photons) / total
    if photons is not None:
        intensity = _rng(rng).poisson(intensity).astype(np.float64)
    return intensity.astype(np.float32)


@dataclass(frozen=True)
class SimulatedCrystal:
    """A simulated crystal and its Bragg pattern.

    Attributes
    ----------
    obj : numpy.ndarray
        complex64 object: amplitude 1 inside the support (sharp edge), ``exp(i·phase)``.
    support : numpy.ndarray
        Boolean support.
    phase : numpy.ndarray
        float32 phase [rad], 0 outside the support (not wrapped).
    intensity : numpy.ndarray
        float32 Bragg intensity (Poisson counts, or noise-free when simulated with ``photons=None``).
    """

    obj: np.ndarray
    support: np.ndarray
    phase: np.ndarray
    intensity: np.ndarray


def _crystal_obj(support: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return (support * np.exp(1j * phase.astype(np.float64))).astype(np.complex64)


def simulate_crystal(shape: tuple[int, int, int] = (64, 64, 64), *, size: float = 0.35,
                     aspect: tuple[float, float, float] = (1.0, 0.85, 0.8), facets: str | int = "hexagonal",
                     phase_kinds: Sequence[str] = ("domains",), phase_amplitude: float = 1.0,
                     photons: float | None = 1e7, seed: int = 0) -> SimulatedCrystal:
    """One crystal: support, phase, object and Bragg intensity, all from ``seed``.

    Parameters
    ----------
    shape, size, aspect, facets
        As :func:`crystal_support`.
    phase_kinds, phase_amplitude
        ``kinds`` and ``amplitude`` of :func:`displacement_phase`.
    photons : float or None
        As :func:`bragg_intensity`.
    seed : int
        Seed of everything random (facets, phase, noise).

    Returns
    -------
    SimulatedCrystal
    """
    rng = np.random.default_rng(seed)
    support = crystal_support(shape, size=size, aspect=aspect, facets=facets, rng=rng)
    phase = displacement_phase(support, kinds=phase_kinds, amplitude=phase_amplitude, rng=rng)
    obj = _crystal_obj(support, phase)
    intensity = bragg_intensity(obj, photons=photons, rng=rng)
    logger.debug("simulated a %s crystal of %d voxels in %s", facets, int(support.sum()), support.shape)
    return SimulatedCrystal(obj=obj, support=support, phase=phase, intensity=intensity)


@dataclass(frozen=True)
class SimulatedSeries:
    """States of one crystal whose phase changes by ``coefficients[i] · pattern``.

    Attributes
    ----------
    states : list of SimulatedCrystal
        One per state, same support; ``states[i].phase = states[0].phase + coefficients[i] * pattern``.
    pattern : numpy.ndarray
        float32 phase-change pattern [rad at coefficient 1], a localized surface domain, 0 outside
        the support.
    coefficients : numpy.ndarray
        float64 ``a_i``, ``a_0 = 0``.
    """

    states: list[SimulatedCrystal]
    pattern: np.ndarray
    coefficients: np.ndarray


def _surface_domain(support: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth domain at the surface: a Gaussian around a surface voxel, fading with depth."""
    coords, centroid, extent = _support_frame(support)
    depth = ndimage.distance_transform_edt(np.pad(support, 1)).astype(np.float32)[1:-1, 1:-1, 1:-1]
    surface = np.argwhere(support & (depth < 1.5)) - np.array(support.shape) // 2
    # the surface voxel farthest along a random direction from the centroid
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    centre = surface[np.argmax((surface - centroid) @ direction)]
    sigma = np.float32(0.22 * extent)
    r2 = sum((c - np.float32(c0)) ** 2 for c, c0 in zip(coords, centre))
    depth_scale = np.float32(max(2.0, 0.15 * extent))
    pattern = np.exp(-r2 / (2 * sigma**2)) * 0.5 * (1 - np.tanh((depth - depth_scale) / np.float32(0.5 * depth_scale)))
    pattern = np.where(support, pattern, 0).astype(np.float32)
    return pattern * np.float32(PATTERN_AMPLITUDE / pattern.max())


def simulate_series(n_states: int = 6, shape: tuple[int, int, int] = (64, 64, 64), *, photons: float | None = 1e7,
                    seed: int = 0, coefficients: Sequence[float] | None = None, **crystal: Any) -> SimulatedSeries:
    """A charge-state series of one crystal: ``phase_i = phase_0 + a_i · pattern``.

    The crystal (shape and support) is the same in every state; the pattern is a smooth surface
    domain of peak ``PATTERN_AMPLITUDE`` (1.5 rad) centred on a random surface voxel, fading over
    ~15 % of the crystal's extent into the bulk. Every state has its own Poisson noise.

    Parameters
    ----------
    n_states : int
        Number of states (>= 2).
    shape : tuple of 3 int
        Array shape.
    photons : float or None
        As :func:`bragg_intensity`, per state.
    seed : int
        Seed of the crystal, the pattern and every state's noise.
    coefficients : sequence of float, optional
        ``a_i``, ``n_states`` values with ``a_0 = 0``; default: ``DEFAULT_COEFFICIENTS``
        (0, 0.4, 0.8, 1.0, 0.7, 0.3), linearly interpolated onto ``n_states`` points.
    **crystal
        ``size``, ``aspect``, ``facets``, ``phase_kinds``, ``phase_amplitude`` of :func:`simulate_crystal`.

    Returns
    -------
    SimulatedSeries

    Raises
    ------
    InputError
        Fewer than 2 states, coefficients of the wrong length or with ``a_0 != 0``, an unknown
        crystal setting, or any invalid crystal setting.
    """
    allowed = ("size", "aspect", "facets", "phase_kinds", "phase_amplitude")
    unknown = sorted(set(crystal) - set(allowed))
    if unknown:
        raise InputError(f"unknown crystal setting(s) {', '.join(unknown)}: use any of {', '.join(allowed)}")
    if isinstance(n_states, bool) or not isinstance(n_states, (int, np.integer)) or n_states < 2:
        raise InputError(f"n_states must be an integer >= 2, got {n_states!r}")
    if coefficients is None:
        coef = np.interp(np.linspace(0, 1, n_states), np.linspace(0, 1, len(DEFAULT_COEFFICIENTS)),
                         DEFAULT_COEFFICIENTS)
    else:
        coef = np.asarray(coefficients, dtype=float)
        if coef.shape != (n_states,) or not np.all(np.isfinite(coef)):
            raise InputError(f"coefficients must be {n_states} finite numbers (one per state), "
                             f"got {list(coefficients)}")
        if coef[0] != 0:
            raise InputError(f"the first coefficient (the reference state) must be 0, got {coef[0]}")
    seeds = np.random.SeedSequence(seed).spawn(n_states + 1)
    rng = np.random.default_rng(seeds[0])
    support = crystal_support(shape, size=crystal.get("size", 0.35), aspect=crystal.get("aspect", (1.0, 0.85, 0.8)),
                              facets=crystal.get("facets", "hexagonal"), rng=rng)
    phase0 = displacement_phase(support, kinds=crystal.get("phase_kinds", ("domains",)),
                                amplitude=crystal.get("phase_amplitude", 1.0), rng=rng)
    pattern = _surface_domain(support, rng)
    states = []
    for a, state_seed in zip(coef, seeds[1:]):
        phase = (phase0 + np.float32(a) * pattern).astype(np.float32)
        obj = _crystal_obj(support, phase)
        intensity = bragg_intensity(obj, photons=photons, rng=np.random.default_rng(state_seed))
        states.append(SimulatedCrystal(obj=obj, support=support, phase=phase, intensity=intensity))
    return SimulatedSeries(states=states, pattern=pattern, coefficients=coef)


def write_simulation(out: str, *, size: int = 64, states: int = 1, photons: float = 1e7, crystal: float = 0.35,
                     facets: str | int = "hexagonal", phase: Sequence[str] = ("domains",), amplitude: float = 1.0,
                     scans: int = 0, seed: int = 0) -> list[str]:
    """Write simulated patterns and their truth to the folder ``out`` (``xrdscale cdi simulate``).

    Files: ``state_NN.cxi`` (the noisy intensity, ``entry_1/data_1/data``), with ``scans`` > 0
    also ``state_NN.nxs`` (that many NeXus rocking-curve scans of the same expected intensity,
    to be summed by the reader), and ``truth.h5``: ``object``, ``support``, ``phase``
    (state, z, y, x), the series' ``pattern`` and ``coefficients``.

    Returns
    -------
    list of str
        The files written, truth last.
    """
    from xrdscale.cdi import io
    from xrdscale.io import storage

    shape = (size, size, size)
    if states == 1:
        one = simulate_crystal(shape, photons=photons, seed=seed, size=crystal, facets=facets,
                               phase_kinds=tuple(phase), phase_amplitude=amplitude)
        sim = SimulatedSeries(states=[one], pattern=np.zeros(shape, np.float32), coefficients=np.zeros(1))
    else:
        sim = simulate_series(states, shape, photons=photons, seed=seed, size=crystal, facets=facets,
                              phase_kinds=tuple(phase), phase_amplitude=amplitude)
    rng = np.random.default_rng(seed + 1)
    paths = []
    for i, st in enumerate(sim.states):
        meta = {"simulated": True, "seed": seed, "photons": photons, "state": i,
                "coefficient": float(sim.coefficients[i])}
        paths.append(io.write_pattern(storage.join(out, f"state_{i:02d}.cxi"), st.intensity, attrs=meta))
        if scans > 0:
            expected = bragg_intensity(st.obj, photons=None) * (photons / DEFAULT_PHOTONS)
            paths.append(io.write_rocking_scans(storage.join(out, f"state_{i:02d}.nxs"), expected, n_scans=scans,
                                                rng=rng))
    truth = storage.join(out, "truth.h5")
    fs, path = storage.filesystem(truth)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with storage.io_errors(truth, "write"), fs.open(path, "wb") as f, h5py.File(f, "w") as h5:
        h5.create_dataset("object", data=np.stack([s.obj for s in sim.states]), compression="gzip")
        h5.create_dataset("support", data=np.stack([s.support for s in sim.states]), compression="gzip")
        h5.create_dataset("phase", data=np.stack([s.phase for s in sim.states]), compression="gzip")
        h5.create_dataset("pattern", data=sim.pattern, compression="gzip")
        h5.create_dataset("coefficients", data=np.asarray(sim.coefficients, dtype=float))
    paths.append(truth)
    return paths
