"""A cross-section of a cylindrical 18650 NCA/graphite cell with known chemistry.

Steel casing (``Fe``), a hollow centre pin (``pin``), and a jelly roll wound as an
Archimedean spiral of Cu | anode (LixC) | separator | cathode (NCA) | Al | cathode |
separator | anode, with an Al (cathode) tab and a Ni0.92Cu0.08 (anode) tab. Per voxel:
phase ``scale`` (the phase's volume fraction of the voxel: a voxel full of one phase has
scale 1 in the absolute units of :mod:`xrdscale.physics.pattern`), lattice parameters
``a``/``c`` and crystallite ``size`` [nm], NaN where a phase is absent or a parameter does
not apply. The names are those of the ``maps`` contract, so the ``truth`` store compares
directly with predicted maps.

Heterogeneities of the paper: the NCA next to the Al tab (``al_tab_roi``, ROI3) keeps its
discharged lattice on charge; the anode has regions of homogeneous (HL), delayed (DL) and
inactive (IN) lithiation; along the voltage series the anode goes graphite → LiC30+
(``LiC30p``) → LiC30 → LiC18 → LiC12 → LiC6 while NCA ``a`` decreases and ``c`` increases.
Lattice parameters and sizes are constant within grain domains (a Voronoi tessellation),
so a whole phantom has a few hundred distinct patterns and scans stay cheap at any size.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from xrdscale.exceptions import ConfigError
from xrdscale.physics.constants import SEPARATOR

logger = logging.getLogger(__name__)

#: Phases of the cell, in the order of the ``phase`` coordinate.
PHASES = ("Fe", "pin", "Cu", "Al", "NiCu", "NCA", "graphite", "LiC30p", "LiC30", "LiC18", "LiC12", "LiC6",
          SEPARATOR.name)
#: Anode phases in the order of lithiation on charge.
LIXC = ("graphite", "LiC30p", "LiC30", "LiC18", "LiC12", "LiC6")
#: Voltages [V] at which the homogeneously lithiated anode is dominated by each LIXC stage (cycle 7 of the paper).
STAGE_VOLTAGES = (2.65, 3.7, 3.79, 3.85, 3.95, 4.2)
#: Materials of the ``layer`` map (index = value).
MATERIALS = ("void", "casing", "pin", "Cu", "anode", "separator", "cathode", "Al", "Al_tab", "anode_tab")
#: Lithiation regions of the ``region`` map (-1 outside the anode).
REGIONS = {"HL": 0, "DL": 1, "IN": 2}
#: Volume fraction of each phase in each material (the rest is electrolyte, binder, pores).
COMPOSITION = {"casing": {"Fe": 1.0}, "pin": {"pin": 1.0}, "Cu": {"Cu": 1.0}, "separator": {SEPARATOR.name: 0.5},
               "cathode": {"NCA": 0.6}, "Al": {"Al": 1.0}, "Al_tab": {"Al": 1.0}, "anode_tab": {"NiCu": 1.0}}
ANODE_FRACTION = 0.65
#: Ranges of the lattice parameters [Å] and crystallite sizes [nm] the phantom draws from
#: (the training ranges of the paper); a phase library covering them covers the phantom.
RANGES = {
    "Fe": {"a": (2.865, 2.869), "size_nm": (300.0, 900.0)},
    "pin": {"a": (3.592, 3.596), "size_nm": (300.0, 900.0)},
    "Cu": {"a": (3.613, 3.617), "size_nm": (200.0, 800.0)},
    "Al": {"a": (4.048, 4.052), "size_nm": (200.0, 800.0)},
    "NiCu": {"a": (3.527, 3.531), "size_nm": (200.0, 800.0)},
    "NCA": {"a": (2.810, 2.875), "c": (14.15, 14.55), "size_nm": (80.0, 400.0)},
    "graphite": {"a": (2.462, 2.466), "c": (6.735, 6.7395), "size_nm": (60.0, 400.0)},
    "LiC30p": {"a": (2.464, 2.469), "c": (20.315, 20.4), "size_nm": (60.0, 400.0)},
    "LiC30": {"a": (2.464, 2.469), "c": (20.6, 20.765), "size_nm": (60.0, 400.0)},
    "LiC18": {"a": (4.270, 4.273), "c": (10.445, 10.47), "size_nm": (60.0, 400.0)},
    "LiC12": {"a": (4.291, 4.295), "c": (7.03, 7.08), "size_nm": (60.0, 400.0)},
    "LiC6": {"a": (4.316, 4.318), "c": (3.67, 3.695), "size_nm": (60.0, 400.0)},
}
#: NCA lattice [Å] discharged (2.65 V) and charged (4.2 V).
NCA_DISCHARGED = {"a": 2.860, "c": 14.235}
NCA_CHARGED = {"a": 2.819, "c": 14.481}
V_MIN, V_MAX = 2.65, 4.2
PAPER_FOV_MM = 19.11
CELL_RADIUS_MM = 9.0
_LAYERS = (("Cu", 10.0), ("anode", 60.0), ("separator", 20.0), ("cathode", 70.0), ("Al", 15.0),
           ("cathode", 70.0), ("separator", 20.0), ("anode", 60.0))  # one winding period, µm
_N_DOMAINS = 32


def default_fov_mm(size: int) -> float:
    """Field of view [mm]: the paper's 19.11 mm, widened at small sizes to keep ≥ 6 air columns per side."""
    return max(PAPER_FOV_MM, 2 * CELL_RADIUS_MM / (1 - 12.0 / size))


#: Radial bands of the NCA state-of-charge gradient (:func:`make_phantom` ``nca_gradient``): the
#: lattice is constant within a band × grain domain, so scans stay cheap.
GRADIENT_BANDS = 8


def make_phantom(size: int, *, voltage: float = V_MIN, seed: int = 0, fov_mm: float | None = None,
                 nca_gradient: float = 0.0) -> xr.Dataset:
    """Build the phantom of an 18650 cell cross-section at one voltage.

    The geometry, domains and heterogeneity regions depend only on ``size``, ``seed`` and
    ``fov_mm``, so phantoms of a voltage series share them and differ in chemistry only.
    Thin layers are widened to at least a fraction of a voxel and the winding period to
    8 voxels (fewer turns) so the jelly roll stays recognisable at demo sizes; partial
    volumes come from 4×4 (2×2 above 256 px) sub-voxel sampling.

    Parameters
    ----------
    size : int
        Voxels per side (48–64 for demos, 637 at paper scale).
    voltage : float
        Cell voltage in [2.65, 4.2] V.
    seed : int
        Seed of the domains and the sampled lattice parameters and sizes.
    fov_mm : float, optional
        Field of view; defaults to :func:`default_fov_mm`.
    nca_gradient : float
        A radial state-of-charge gradient of the cathode: the NCA of the roll outside ROI3 is
        charged to ``f(ρ) = f(V) + nca_gradient · (ρ − ½)`` (clipped to [0, 1]) of the way from
        its discharged to its charged lattice, ``ρ`` the normalised radius in the roll (0 inner,
        1 outer) in :data:`GRADIENT_BANDS` bands. 0 (the default) is the uniform cathode;
        e.g. 0.6 at 3.4 V spans a ≈ 2.857–2.832 Å, c ≈ 14.25–14.40 Å.

    Returns
    -------
    xarray.Dataset
        ``scale``, ``a``, ``c``, ``size``, ``weight_fraction`` (phase, y, x); ``region``,
        ``layer`` (y, x) int8; ``al_tab_roi`` (y, x) bool; coords ``y``, ``x`` [mm] centred on
        the rotation axis; attrs ``voltage``, ``state``, ``voxel_size_mm``,
        ``cell_center_mm`` ([y, x]), ``materials``, ``regions``, ``seed``.

    Examples
    --------
    >>> ph = make_phantom(48, voltage=4.2)
    >>> float(ph.scale.sel(phase="LiC6").max()) > 0
    True
    """
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ConfigError(f"phantom size {size!r} is too small; give an integer of at least 16 voxels per side")
    if not V_MIN <= voltage <= V_MAX:
        raise ConfigError(f"voltage {voltage} V is outside the cycling window {V_MIN}–{V_MAX} V; pick one inside it")
    if not (np.isfinite(nca_gradient) and abs(nca_gradient) <= 2.0):
        raise ConfigError(f"nca_gradient {nca_gradient!r} must be a finite state-of-charge difference across the "
                          "roll in [-2, 2] (0: a uniform cathode)")
    fov = float(fov_mm) if fov_mm is not None else default_fov_mm(size)
    vox = fov / size
    if fov < 2 * CELL_RADIUS_MM + 2 * vox:
        raise ConfigError(f"field of view {fov} mm does not hold the 18 mm cell with air around it; give at least "
                          f"{2 * CELL_RADIUS_MM + 2 * vox:.2f} mm")
    rng = np.random.default_rng(seed)
    coord = (np.arange(size) - (size - 1) / 2.0) * vox
    center = rng.uniform(-0.15, 0.15, 2)                                    # cell centre (y, x) [mm]
    geo = _Geometry(vox, center, rng)
    ss = 4 if size <= 256 else 2
    sub = ((np.arange(ss) + 0.5) / ss - 0.5) * vox
    fractions = np.zeros((len(MATERIALS), size, size), dtype=np.float32)
    for dy in sub:
        yy = coord[:, None] + dy
        for dx in sub:
            mat = geo.material(yy, coord[None, :] + dx)
            for m in range(1, len(MATERIALS)):
                fractions[m] += (mat == m) / ss**2
    fractions[0] = np.clip(1 - fractions[1:].sum(axis=0), 0, 1)
    y2, x2 = np.meshgrid(coord, coord, indexing="ij")
    r, theta, rho = geo.polar(y2, x2)
    roi = geo.al_tab_distance(y2, x2) <= max(1.0, 3 * vox)
    roi &= (r >= geo.r_roll_in) & (r <= geo.r_roll_out)
    region = geo.region(r, theta, rho)
    domains = np.argmin((y2[..., None] - geo.seeds[:, 0]) ** 2 + (x2[..., None] - geo.seeds[:, 1]) ** 2, axis=-1)

    scale = {p: np.zeros((size, size)) for p in PHASES}
    for m, name in enumerate(MATERIALS):
        for phase, vf in COMPOSITION.get(name, {}).items():
            scale[phase] += vf * fractions[m]
    anode = fractions[MATERIALS.index("anode")] * ANODE_FRACTION
    stage = _stage_index(voltage, region, rho)
    lo = np.floor(stage).astype(int)
    frac = stage - lo
    for k, phase in enumerate(LIXC):
        scale[phase] += anode * np.where(lo == k, 1 - frac, 0) + anode * np.where(lo + 1 == k, frac, 0)
    region = np.where(anode > 0, region, -1).astype(np.int8)

    params = _domain_params(rng, voltage)
    if nca_gradient:
        _apply_gradient(params["NCA"], voltage, nca_gradient)
        domains_nca = np.where(roi, domains + _N_DOMAINS, domains + 2 * _N_DOMAINS * (1 + _band(rho)))
    else:
        domains_nca = np.where(roi, domains + _N_DOMAINS, domains)
    lattice = {key: np.full((len(PHASES), size, size), np.nan, dtype=np.float32) for key in ("a", "c", "size")}
    for i, phase in enumerate(PHASES):
        present = scale[phase] > 0
        if phase not in RANGES:
            continue
        table = params[phase]
        dom = domains_nca if phase == "NCA" else domains
        for key, out_key in (("a", "a"), ("c", "c"), ("size_nm", "size")):
            if key in table:
                lattice[out_key][i] = np.where(present, table[key][dom], np.nan)
    scale_arr = np.stack([scale[p] for p in PHASES]).astype(np.float32)
    layer = np.where(fractions.max(axis=0) > 0, np.argmax(fractions, axis=0), 0).astype(np.int8)
    ds = xr.Dataset(
        {"scale": (("phase", "y", "x"), scale_arr),
         "a": (("phase", "y", "x"), lattice["a"]),
         "c": (("phase", "y", "x"), lattice["c"]),
         "size": (("phase", "y", "x"), lattice["size"]),
         "weight_fraction": (("phase", "y", "x"), _weight_fractions(scale_arr, lattice)),
         "region": (("y", "x"), region),
         "layer": (("y", "x"), layer),
         "al_tab_roi": (("y", "x"), roi)},
        coords={"phase": np.array(PHASES, dtype=object), "y": coord, "x": coord},
        attrs={"voltage": float(voltage), "state": state_of(voltage), "voxel_size_mm": vox, "fov_mm": fov,
               "cell_center_mm": [float(center[0]), float(center[1])], "materials": list(MATERIALS),
               "regions": dict(REGIONS), "seed": int(seed), "turns": geo.turns,
               "nca_gradient": float(nca_gradient)},
    )
    ds["y"].attrs["units"] = ds["x"].attrs["units"] = "mm"
    ds["size"].attrs["units"] = "nm"
    ds["a"].attrs["units"] = ds["c"].attrs["units"] = "angstrom"
    logger.info("phantom %d² at %.2f V: %d turns, voxel %.3f mm", size, voltage, geo.turns, vox)
    return ds


def state_of(voltage: float) -> str:
    """``discharged`` at the bottom of the window, ``charged`` at the top, else ``charging``."""
    if voltage <= V_MIN + 1e-6:
        return "discharged"
    if voltage >= V_MAX - 1e-6:
        return "charged"
    return "charging"


class _Geometry:
    """Radii, spiral and tabs of the cell (mm), thin parts widened to stay visible."""

    def __init__(self, vox: float, center: np.ndarray, rng: np.random.Generator) -> None:
        self.center = center
        self.t_case = max(0.25, 0.7 * vox)
        self.r_pin, self.t_pin = 1.1, max(0.2, 0.7 * vox)
        self.r_roll_in = 2.0
        self.r_roll_out = CELL_RADIUS_MM - self.t_case - max(0.15, 0.3 * vox)
        pitch_um = sum(w for _, w in _LAYERS)
        self.pitch = max(pitch_um / 1000.0, 8 * vox)
        self.bounds = np.cumsum([w for _, w in _LAYERS]) / pitch_um * self.pitch
        self.layer_ids = np.array([MATERIALS.index(name) for name, _ in _LAYERS])
        self.turns = int((self.r_roll_out - self.r_roll_in) / self.pitch)
        self.tab_t = max(0.1, 1.0 * vox)
        self.al_tab = (self.r_roll_in + 0.45 * (self.r_roll_out - self.r_roll_in), 0.3 * np.pi, 3.5)
        self.an_tab = (self.r_roll_out - self.tab_t, 1.25 * np.pi, 3.0)
        self.dl_angle, self.in_angle = 0.75 * np.pi, self.an_tab[1]
        cells = rng.uniform(0, 1, (_N_DOMAINS, 2))
        rad, ang = CELL_RADIUS_MM * np.sqrt(cells[:, 0]), 2 * np.pi * cells[:, 1]
        self.seeds = np.stack([center[0] + rad * np.sin(ang), center[1] + rad * np.cos(ang)], axis=1)

    def polar(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Radius, angle in [0, 2π) and normalised radius in the roll (0 inner, 1 outer)."""
        dy, dx = y - self.center[0], x - self.center[1]
        r = np.hypot(dy, dx)
        theta = np.mod(np.arctan2(dy, dx), 2 * np.pi)
        return r, theta, (r - self.r_roll_in) / (self.r_roll_out - self.r_roll_in)

    def _tab_distance(self, y: np.ndarray, x: np.ndarray, tab: tuple[float, float, float]) -> np.ndarray:
        r_tab, ang, width = tab
        dy, dx = y - self.center[0], x - self.center[1]
        radial = dx * np.cos(ang) + dy * np.sin(ang)
        tangential = -dx * np.sin(ang) + dy * np.cos(ang)
        return np.hypot(np.maximum(np.abs(radial - r_tab) - self.tab_t / 2, 0),
                        np.maximum(np.abs(tangential) - width / 2, 0))

    def al_tab_distance(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Distance [mm] to the Al tab (0 inside it)."""
        return self._tab_distance(y, x, self.al_tab)

    def material(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Material index (into :data:`MATERIALS`) at points (y, x) [mm]."""
        r, theta, _ = self.polar(y, x)
        mat = np.zeros(np.broadcast(y, x).shape, dtype=np.int8)
        mat[(r <= CELL_RADIUS_MM) & (r > CELL_RADIUS_MM - self.t_case)] = MATERIALS.index("casing")
        mat[(r <= self.r_pin) & (r > self.r_pin - self.t_pin)] = MATERIALS.index("pin")
        roll = (r >= self.r_roll_in) & (r <= self.r_roll_out)
        u = np.mod(r - self.r_roll_in - self.pitch * theta / (2 * np.pi), self.pitch)
        layer = self.layer_ids[np.minimum(np.searchsorted(self.bounds, u, side="right"), len(self.bounds) - 1)]
        mat[roll] = layer[roll]
        mat[self._tab_distance(y, x, self.al_tab) == 0] = MATERIALS.index("Al_tab")
        mat[self._tab_distance(y, x, self.an_tab) == 0] = MATERIALS.index("anode_tab")
        return mat

    def region(self, r: np.ndarray, theta: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """HL/DL/IN region of every point (anode or not)."""
        def near(angle: float, half_deg: float) -> np.ndarray:
            return np.abs(np.angle(np.exp(1j * (theta - angle)))) <= np.deg2rad(half_deg)

        region = np.full(r.shape, REGIONS["HL"], dtype=np.int8)
        region[near(self.dl_angle, 35.0)] = REGIONS["DL"]
        region[near(self.in_angle, 30.0) & (rho > 0.5)] = REGIONS["IN"]
        return region


def _stage_index(voltage: float, region: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Continuous LIXC index per voxel.

    HL follows the voltage (outer turns slightly ahead), DL lags two stages, IN stays graphite.
    """
    s0 = float(np.interp(voltage, STAGE_VOLTAGES, np.arange(len(LIXC), dtype=float)))
    hl = s0 + 0.4 * (np.clip(rho, 0, 1) - 0.5)
    stage = np.where(region == REGIONS["DL"], s0 - 2.0, hl)
    stage = np.where(region == REGIONS["IN"], 0.0, stage)
    return np.clip(stage, 0.0, len(LIXC) - 1.0)


def _domain_params(rng: np.random.Generator, voltage: float) -> dict[str, dict[str, np.ndarray]]:
    """Per-domain lattice parameters and sizes; NCA has 2 × domains (normal, then ROI3)."""
    out = {}
    for phase, ranges in RANGES.items():
        table = {}
        n = 2 * _N_DOMAINS if phase == "NCA" else _N_DOMAINS
        for key, (lo, hi) in ranges.items():
            if key == "size_nm":
                table[key] = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
            elif phase == "NCA":
                f = np.r_[np.full(_N_DOMAINS, (voltage - V_MIN) / (V_MAX - V_MIN)), np.zeros(_N_DOMAINS)]
                mean = _nca_lattice(key, f)
                jitter = {"a": 0.002, "c": 0.01}[key]
                table[key] = np.clip(mean + rng.uniform(-jitter, jitter, n), lo, hi)
            else:
                mid, half = (lo + hi) / 2, (hi - lo) / 2
                table[key] = mid + rng.uniform(-0.5, 0.5, n) * half
        out[phase] = table
    return out


def _nca_lattice(key: str, f: float | np.ndarray) -> float | np.ndarray:
    """NCA ``a`` or ``c`` [Å] charged to ``f`` of the way from its discharged to its charged lattice."""
    return NCA_DISCHARGED[key] + f * (NCA_CHARGED[key] - NCA_DISCHARGED[key])


def _band(rho: np.ndarray) -> np.ndarray:
    """Radial band index in [0, GRADIENT_BANDS) of the normalised roll radius."""
    return np.clip(np.floor(np.asarray(rho) * GRADIENT_BANDS), 0, GRADIENT_BANDS - 1).astype(int)


def _apply_gradient(table: dict[str, np.ndarray], voltage: float, gradient: float) -> None:
    """Append the NCA lattice of every (band, domain) to ``table`` (index ``2N(1 + band) + domain``).

    Each band's state of charge is taken at its centre; a domain keeps its own jitter (its
    offset from the uniform cathode's mean) in every band.
    """
    f0 = (voltage - V_MIN) / (V_MAX - V_MIN)
    lo_hi = RANGES["NCA"]
    for key in ("a", "c"):
        uniform = table[key][:_N_DOMAINS]
        jitter = uniform - _nca_lattice(key, f0)
        parts = [table[key]]
        for band in range(GRADIENT_BANDS):
            f = np.clip(f0 + gradient * ((band + 0.5) / GRADIENT_BANDS - 0.5), 0.0, 1.0)
            parts += [np.clip(_nca_lattice(key, f) + jitter, *lo_hi[key]), np.full(_N_DOMAINS, np.nan)]
        table[key] = np.concatenate(parts)
    size = table["size_nm"]
    table["size_nm"] = np.concatenate([size] + [size[:_N_DOMAINS], np.full(_N_DOMAINS, np.nan)] * GRADIENT_BANDS)


def _weight_fractions(scale: np.ndarray, lattice: dict[str, np.ndarray]) -> np.ndarray:
    """Mass fractions among the crystalline phases: volume fraction × density, normalised (separator NaN).

    This is the truth generator's own, independent route to the weight fractions, kept on
    purpose as an oracle for :func:`xrdscale.analysis.fractions.weight_fractions`: it starts
    from what the phantom *is* — volume fractions of phases of known crystallographic
    density ρ = Z·M / (N_A · V), evaluated at each voxel's own lattice — and never touches
    the Hill & Howard mass factor ``ZMV/V²`` of :mod:`xrdscale.physics.quant` that the
    analysis applies to scale factors. The two agree because ``scale`` is the volume
    fraction and ``ZMV/V² = N_A · ρ``; ``tests/test_phantom.py`` checks that they do.
    """
    from xrdscale.physics.crystal import Phase, builtin_phase, cell_volume

    mass = np.zeros_like(scale, dtype=np.float64)
    for i, phase in enumerate(PHASES):
        if phase not in RANGES:
            continue
        ph = builtin_phase(phase)
        assert isinstance(ph, Phase)  # every phase of RANGES has a structure
        present = scale[i] > 0
        if not present.any():
            continue
        kw = {k: lattice[k][i][present].astype(float) for k in ph.lattice_keys}
        rho = ph.density() * ph.volume() / cell_volume(ph.system, kw["a"], kw.get("c"))  # g/cm³ at each voxel's lattice
        mass[i][present] = scale[i][present] * rho
    total = mass.sum(axis=0)
    wf = np.where(total > 0, mass / np.where(total > 0, total, 1), np.nan)
    wf[PHASES.index(SEPARATOR.name)] = np.nan
    return wf.astype(np.float32)
