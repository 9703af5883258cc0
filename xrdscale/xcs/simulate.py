"""Simulated XCS spectra of a solid-state Li-metal coin cell: three beam planes R1, R2, R3 per pixel.

The cell is the paper's (Huang et al. 2025): a Li_x NMC622 cathode, a PEO15:LiTFSI solid polymer
electrolyte (SPE) and a Li-metal anode, imaged with a 115 keV beam scattered at 90° onto a
pixelated energy-resolving detector. Per pixel the three components have expected spectra

- C (cathode): ``n_C(y, x) · (b_host + x(y, x) · b_Li)``, with ``b_host`` the response to one
  Ni0.6Mn0.2Co0.2O2 unit and ``b_Li`` the response to one Li atom (so C is linear in the Li
  content ``x``);
- S (SPE): ``n_S(y, x) · b_SPE`` per (C2H4O)15·LiTFSI unit;
- A (anode): ``n_A(y, x) · b_Li``;

and the planes are the paper's mixtures (Eqs. 2–3): ``R3 = A``, ``R2 = S + α·A``,
``R1 = C + S + β·A``, so ``C = R1 − R2 + (α − β)·R3`` holds exactly for the expected counts.

A basis response ``b`` of a material is, per formula unit: its Compton spectrum
(:func:`xrdscale.xcs.physics.compton_spectrum`, impulse approximation with the ``E2/E1`` factor)
times the bin width, convolved with the Gaussian detector response (``resolution_fwhm_kev``); plus,
when enabled, an elastic (Rayleigh) line at the incident energy with ``Σ n_Z A_Z dσ_R/dΩ / Σ n_Z
A_Z dσ_C/dΩ`` (xraylib's ``DCS_Rayl``/``DCS_Compt`` at the incident energy and angle) of the
material's Compton counts; plus the CdZnTe detector's Cd/Te Kα1/Kβ1 fluorescence lines
(:func:`~xrdscale.xcs.physics.fluorescence_lines`), :data:`FLUORESCENCE_FRACTION` of its Compton
counts in all (the detector fluoresces in proportion to the photons it absorbs). Every part is
proportional to the material's scattering, so the model stays linear and the separation exact.

The formula units in the beam path per pixel, ``n_c(y, x) = N_c · t_c(y, x)``, are smooth positive
thickness maps ``t_c`` (mean 1, a few to ~15 % lateral variation, different for every component; see
:func:`thickness_maps`) times constants ``N_c`` chosen so that, on average and at ``x = 1``, the
cathode holds :data:`ELECTRON_SHARES` ``["cathode"]`` of the electrons of the three components, the
SPE and the anode theirs; the overall scale makes the mean expected total of plane R1 equal to
``counts_per_pixel``. Everything is a few basis spectra, one convolution each and one ``einsum``
over the pixels; then Poisson noise.

>>> cell = simulate_cell(shape=(4, 4), bins=800, seed=1)
>>> cell["counts"].shape, cell["planes"]
((3, 4, 4, 800), ('R1', 'R2', 'R3'))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np
import xraylib
from scipy import ndimage
from scipy.special import erf

from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.xcs import physics, spectra

logger = logging.getLogger(__name__)

#: Names of the beam planes, in the order of the ``counts`` plane axis.
PLANES = ("R1", "R2", "R3")
#: Names of the components.
COMPONENTS = ("cathode", "spe", "anode")
#: Mean shares of the electrons in the beam of the three components (cathode at x = 1).
ELECTRON_SHARES = {"cathode": 0.45, "spe": 0.30, "anode": 0.25}
#: Fluorescence counts of the detector (all four lines) per Compton count.
FLUORESCENCE_FRACTION = 0.04
#: Relative intensities of the fluorescence lines (Kα1 : Kβ1 ≈ 0.83 : 0.17 for Cd and Te alike).
FLUORESCENCE_WEIGHTS = {"Cd Ka1": 0.83 * 0.45, "Cd Kb1": 0.17 * 0.45, "Te Ka1": 0.83 * 0.55, "Te Kb1": 0.17 * 0.55}
#: Lowest bin centre of the simulated energy axis [keV].
E_MIN_KEV = 5.0
#: x range of the ``"gradient"`` state.
GRADIENT = (0.3, 1.0)


def energy_axis(bins: int = 4000, e_max_kev: float = 120.0, e_min_kev: float = E_MIN_KEV) -> np.ndarray:
    """``bins`` equally spaced bin centres [keV] from ``e_min_kev`` to ``e_max_kev``."""
    if int(bins) != bins or bins < 2:
        raise InputError(f"bins must be an integer >= 2, got {bins!r}")
    if not e_max_kev > e_min_kev:
        raise InputError(f"e_max_kev must exceed {e_min_kev} keV, got {e_max_kev!r}")
    return np.linspace(e_min_kev, e_max_kev, int(bins))


def thickness_maps(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Smooth positive lateral thickness maps ``t_c(y, x)`` of the components, each of mean 1.

    Cathode: ``1 + 0.12 cos(π(u − 0.3)) sin(π v) − 0.04 u``; SPE: ``1 + 0.08 (u − 0.5) + 0.05 cos(2π v)``;
    anode: ``1 + 0.15 (v − 0.5) − 0.1 (u − 0.5)²`` (``u``, ``v`` the column and row coordinates in
    [0, 1]), each divided by its mean.
    """
    ny, nx = shape
    v, u = np.meshgrid(np.linspace(0.0, 1.0, ny), np.linspace(0.0, 1.0, nx), indexing="ij")
    maps = {
        "cathode": 1.0 + 0.12 * np.cos(np.pi * (u - 0.3)) * np.sin(np.pi * v) - 0.04 * u,
        "spe": 1.0 + 0.08 * (u - 0.5) + 0.05 * np.cos(2 * np.pi * v),
        "anode": 1.0 + 0.15 * (v - 0.5) - 0.1 * (u - 0.5) ** 2,
    }
    return {k: m / m.mean() for k, m in maps.items()}


def x_map(state: float | str | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The Li content map ``x(y, x)`` of a state: a number (uniform), ``"gradient"`` or a map.

    ``"gradient"`` rises linearly along x (columns) from :data:`GRADIENT` ``[0]`` to ``[1]``.
    """
    if isinstance(state, str):
        if state != "gradient":
            raise InputError(f"a state is a Li content x (a number), a (y, x) map or 'gradient', got {state!r}")
        row = np.linspace(GRADIENT[0], GRADIENT[1], shape[1])
        return np.broadcast_to(row, shape).copy()
    arr = np.asarray(state, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(shape, float(arr))
    if arr.shape != tuple(shape):
        raise InputError(f"the x map has shape {arr.shape}, expected the detector shape {tuple(shape)}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InputError("x (Li per NMC622 formula unit) must be finite and >= 0 everywhere")
    return arr


def _gaussian_lines(energy: np.ndarray, centres: Mapping[str, float], weights: Mapping[str, float],
                    sigma: float) -> np.ndarray:
    """Sum of unit-area-times-weight Gaussians integrated over the bins of ``energy``."""
    mid = 0.5 * (energy[1:] + energy[:-1])
    edges = np.concatenate([[2 * energy[0] - mid[0]], mid, [2 * energy[-1] - mid[-1]]])
    out = np.zeros(energy.size)
    for name, w in weights.items():
        z = (edges - centres[name]) / (np.sqrt(2.0) * sigma)
        out += w * 0.5 * np.diff(erf(z))
    return out


def _elastic_ratio(comp: Mapping[int, float], e1: float, angle_deg: float) -> float:
    theta = np.deg2rad(angle_deg)
    rayl = sum(n * xraylib.AtomicWeight(z) * xraylib.DCS_Rayl(z, e1, theta) for z, n in comp.items())
    compt = sum(n * xraylib.AtomicWeight(z) * xraylib.DCS_Compt(z, e1, theta) for z, n in comp.items())
    return float(rayl / compt)


def basis_spectra(energy: np.ndarray, *, incident_kev: float = 115.0, angle_deg: float = 90.0,
                  resolution_fwhm_kev: float = 0.8, fluorescence: bool = True,
                  elastic: bool = True) -> dict[str, np.ndarray]:
    """Detector responses (counts per bin) to one formula unit of the materials of the cell.

    Parameters
    ----------
    energy : numpy.ndarray
        Equally spaced bin centres [keV].
    incident_kev, angle_deg : float
        Beam energy and scattering angle.
    resolution_fwhm_kev : float
        FWHM of the Gaussian detector response [keV].
    fluorescence, elastic : bool
        Add the detector's Cd/Te lines and the elastic line (see the module docstring).

    Returns
    -------
    dict
        ``"host"`` (Ni0.6Mn0.2Co0.2O2), ``"li"`` (one Li atom), ``"spe"`` (PEO15:LiTFSI), each
        ``(bin,)`` expected counts for a unit cross-section per electron; their Compton parts sum to
        about the electrons of the material (less what falls outside the axis).
    """
    e = np.asarray(energy, dtype=np.float64)
    step = np.diff(e)
    if e.ndim != 1 or e.size < 2 or not np.allclose(step, step[0], rtol=1e-6):
        raise InputError("the simulated energy axis must be equally spaced bin centres (keV)")
    width = float(step[0])
    sigma = resolution_fwhm_kev / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    if not sigma > 0:
        raise InputError(f"resolution_fwhm_kev must be > 0, got {resolution_fwhm_kev!r}")
    lines = physics.fluorescence_lines()
    materials = {"host": physics.nmc622(0.0), "li": physics.li_metal(), "spe": physics.spe_peo_litfsi(15)}
    out: dict[str, np.ndarray] = {}
    for name, comp in materials.items():
        # sample the Compton spectrum 5x finer than the bins, integrate per bin, then blur
        sub = e[:, None] + width * (np.arange(5)[None, :] - 2) / 5.0
        compton = physics.compton_spectrum(comp, sub, incident_kev, angle_deg).mean(axis=1) * width
        response = ndimage.gaussian_filter1d(compton, sigma / width, mode="constant", truncate=6.0)
        total = float(compton.sum())
        if elastic:
            ratio = _elastic_ratio(comp, incident_kev, angle_deg)
            response += ratio * total * _gaussian_lines(e, {"elastic": incident_kev}, {"elastic": 1.0}, sigma)
        if fluorescence:
            weights = {k: FLUORESCENCE_FRACTION * total * w for k, w in FLUORESCENCE_WEIGHTS.items()}
            response += _gaussian_lines(e, lines, weights, sigma)
        out[name] = response
    return out


def simulate_cell(*, x: float | np.ndarray | str = 1.0, shape: tuple[int, int] = (16, 16), bins: int = 4000,
                  e_max_kev: float = 120.0, incident_kev: float = 115.0, angle_deg: float = 90.0,
                  counts_per_pixel: float = 2e4, resolution_fwhm_kev: float = 0.8, alpha: float = 0.3,
                  beta: float = 0.2, fluorescence: bool = True, elastic: bool = True,
                  seed: int | None = 0) -> dict[str, Any]:
    """Simulate one state of the cell: Poisson spectra of the planes R1, R2, R3 of every pixel.

    Parameters
    ----------
    x : float, (y, x) array or "gradient"
        Li content of the Li_x NMC622 cathode (see :func:`x_map`).
    shape : (int, int)
        Detector pixels (y, x).
    bins : int
        Energy bins, equally spaced from :data:`E_MIN_KEV` to ``e_max_kev``.
    e_max_kev : float
        Highest bin centre [keV].
    incident_kev, angle_deg : float
        Beam energy [keV] and scattering angle [degrees].
    counts_per_pixel : float
        Mean expected total counts of a pixel of plane R1.
    resolution_fwhm_kev : float
        FWHM of the Gaussian detector response [keV].
    alpha, beta : float
        Anode fractions of planes R2 and R1 (Eqs. 2–3).
    fluorescence, elastic : bool
        Add the detector's Cd/Te lines and the elastic line.
    seed : int or None
        Seed of ``numpy.random.default_rng`` for the Poisson noise.

    Returns
    -------
    dict
        ``counts`` ``(3, y, x, bin)`` float32 Poisson counts; ``expected`` (float64, noise-free);
        ``energy`` ``(bin,)``; ``planes`` ``("R1", "R2", "R3")``; ``x`` ``(y, x)`` truth map;
        ``components`` ``{"cathode", "spe", "anode"}`` → ``(y, x, bin)`` float64 expected spectra;
        ``units`` ``{component: (y, x)}`` formula units in the beam (scaled); ``alpha``, ``beta``,
        ``incident_kev``, ``angle_deg``, ``resolution_fwhm_kev``, ``seed``.
    """
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be two positive integers (y, x), got {shape!r}") from None
    if ny < 1 or nx < 1:
        raise InputError(f"shape must be two positive integers (y, x), got {shape!r}")
    if not incident_kev > 0 or not 0 < angle_deg <= 180:
        raise InputError(f"incident_kev must be > 0 and angle_deg in (0, 180], got {incident_kev!r}, {angle_deg!r}")
    if not counts_per_pixel > 0:
        raise InputError(f"counts_per_pixel must be > 0, got {counts_per_pixel!r}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"{name} must be finite and >= 0, got {value!r}")
    xm = x_map(x, (ny, nx))
    energy = energy_axis(bins, e_max_kev)
    basis = basis_spectra(energy, incident_kev=incident_kev, angle_deg=angle_deg,
                          resolution_fwhm_kev=resolution_fwhm_kev, fluorescence=fluorescence, elastic=elastic)
    thick = thickness_maps((ny, nx))
    # formula units per electron share: N_c = share / electrons per unit (cathode at x = 1)
    per_unit = {"cathode": physics.electrons(physics.nmc622(1.0)),
                "spe": physics.electrons(physics.spe_peo_litfsi(15)),
                "anode": physics.electrons(physics.li_metal())}
    units = {c: ELECTRON_SHARES[c] / per_unit[c] * thick[c] for c in COMPONENTS}
    # weights of the basis (host, li, spe) for every component: (component, y, x, basis)
    w = np.zeros((3, ny, nx, 3))
    w[0, ..., 0] = units["cathode"]
    w[0, ..., 1] = units["cathode"] * xm
    w[1, ..., 2] = units["spe"]
    w[2, ..., 1] = units["anode"]
    b = np.stack([basis["host"], basis["li"], basis["spe"]])  # (basis, bin)
    comps = np.einsum("cyxk,kb->cyxb", w, b)
    mix = np.array([[1.0, 1.0, beta], [0.0, 1.0, alpha], [0.0, 0.0, 1.0]])  # planes x components
    r1_mean = float(np.einsum("c,cyxb->", mix[0], comps)) / (ny * nx)
    scale = counts_per_pixel / r1_mean
    comps *= scale
    expected = np.einsum("pc,cyxb->pyxb", mix, comps)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(expected).astype(np.float32)
    logger.debug("simulated cell %dx%d, %d bins, x mean %.3f, R1 mean %.3g counts", ny, nx, bins, xm.mean(),
                 expected[0].sum(axis=-1).mean())
    return {
        "counts": counts, "expected": expected, "energy": energy, "planes": PLANES, "x": xm,
        "components": {name: comps[i] for i, name in enumerate(COMPONENTS)},
        "units": {c: units[c] * scale for c in COMPONENTS},
        "alpha": float(alpha), "beta": float(beta), "incident_kev": float(incident_kev),
        "angle_deg": float(angle_deg), "resolution_fwhm_kev": float(resolution_fwhm_kev), "seed": seed,
    }


def write_cell(out: str, *, states: Sequence[float | str] = (1.0, 0.6), labels: Sequence[str] | None = None,
               shape: tuple[int, int] = (16, 16), hxt: bool = False, seed: int = 0, **kw: Any) -> list[str]:
    """Write simulated states of the cell: ``out/<label>.h5`` per state and ``out/truth.h5``.

    Parameters
    ----------
    out : str
        Destination folder (local path or fsspec URL).
    states : sequence of float or "gradient"
        Li content x of every state (uniform), or ``"gradient"`` (x from 0.3 to 1.0 along the columns).
    labels : sequence of str, optional
        File names of the states (default ``state_00``, ``state_01``, …).
    shape : (int, int)
        Detector pixels.
    hxt : bool
        Also write every plane of every state as ``out/<label>_<plane>.hxt``.
    seed : int
        State ``i`` uses Poisson seed ``seed + i``.
    **kw
        Further keyword arguments of :func:`simulate_cell`.

    Returns
    -------
    list of str
        The paths written: the states' ``.h5`` (and ``.hxt``) files, ``references.csv`` (noise-free
        reference states for a calibration, :func:`reference_table`), ``truth.h5`` last.

    Notes
    -----
    A state file is :func:`xrdscale.xcs.spectra.write_cube` of the 4D counts with planes R1–R3 and the
    attributes ``incident_kev``, ``angle_deg``, ``alpha``, ``beta``, ``x_mean``, ``resolution_fwhm_kev``,
    ``label``, ``simulated``. ``truth.h5`` holds ``labels``, ``x`` ``(state, y, x)``, ``energy`` and
    ``components/<name>`` ``(state, bin)`` (the noise-free component spectra summed over the pixels),
    with ``alpha``, ``beta``, ``incident_kev``, ``angle_deg`` as attributes.
    """
    states = list(states)
    if not states:
        raise InputError("write_cell: give at least one state")
    if labels is None:
        names = [f"state_{i:02d}" for i in range(len(states))]
    else:
        names = [str(label) for label in labels]
        if len(names) != len(states) or len(set(names)) != len(names):
            raise InputError(f"write_cell: {len(names)} label(s) for {len(states)} state(s); labels must be unique")
    for key in ("x", "seed"):
        if key in kw:
            raise InputError(f"write_cell: {key!r} is set per state; use states= and seed=")
    paths: list[str] = []
    xs, summed = [], []
    cell: dict[str, Any] = {}
    for i, (state, label) in enumerate(zip(states, names, strict=True)):
        cell = simulate_cell(x=state, shape=shape, seed=seed + i, **kw)
        attrs = {k: cell[k] for k in ("incident_kev", "angle_deg", "alpha", "beta", "resolution_fwhm_kev")}
        attrs.update(x_mean=float(cell["x"].mean()), label=label, simulated=True)
        paths.append(spectra.write_cube(storage.join(out, f"{label}.h5"), cell["counts"], cell["energy"],
                                        planes=cell["planes"], attrs=attrs))
        if hxt:
            for p, plane in enumerate(cell["planes"]):
                paths.append(spectra.write_hxt(storage.join(out, f"{label}_{plane}.hxt"), cell["counts"][p],
                                               cell["energy"], prefix=f"{label}_{plane}"))
        xs.append(cell["x"])
        summed.append({name: comp.sum(axis=(0, 1)) for name, comp in cell["components"].items()})
    truth = storage.join(out, "truth.h5")
    with storage.staged(truth) as local, h5py.File(local, "w") as h5:
        for k in ("alpha", "beta", "incident_kev", "angle_deg", "resolution_fwhm_kev"):
            h5.attrs[k] = cell[k]
        h5.create_dataset("labels", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("x", data=np.stack(xs))
        h5.create_dataset("energy", data=cell["energy"]).attrs["units"] = "keV"
        group = h5.create_group("components")
        for name in COMPONENTS:
            group.create_dataset(name, data=np.stack([s[name] for s in summed]))
    refs = storage.join(out, "references.csv")
    storage.write_bytes(refs, reference_table(**kw).to_csv(index=False).encode())
    paths.append(refs)
    paths.append(truth)
    logger.info("wrote %d simulated state(s) of the cell to %s", len(states), storage.redact(out))
    return paths


def reference_table(xs: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), **kw: Any) -> Any:
    """Reference states of known x for a calibration: the EMR of the noise-free cathode spectrum at each x.

    What a beamline would measure on reference cathodes of ICP-AES-known Li content, here
    computed without noise for the instrument of ``kw`` (:func:`simulate_cell`'s incident
    energy, angle, resolution, bins). Columns ``state``, ``emr``, ``x``: the input of
    ``xrdscale xcs calibrate``.
    """
    import pandas as pd

    from xrdscale.xcs import emr

    kw = {k: v for k, v in kw.items() if k not in ("counts_per_pixel", "shape", "alpha", "beta")}
    rows = []
    for x in xs:
        cell = simulate_cell(x=float(x), shape=(2, 2), **kw)
        spectrum = cell["components"]["cathode"].sum(axis=(0, 1))
        ratio, _ = emr.emr(spectrum, cell["energy"], incident_kev=cell["incident_kev"], angle_deg=cell["angle_deg"])
        rows.append({"state": f"reference x={float(x):g}", "emr": float(ratio), "x": float(x)})
    return pd.DataFrame(rows)
