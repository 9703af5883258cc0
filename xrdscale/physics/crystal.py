"""Phases from crystal structures: CIF → reflections (q, multiplicity, |F|²) for any lattice.

Structures are read and structure factors computed with gemmi (a maintained C++/Python
crystallography library with CIF parsing, all 230 space groups and X-ray form factors).
The anomalous correction f' at the beam energy comes from xraylib; f'' is below 0.1 % of
f at the 95 keV of the paper and is left out.

A :class:`Phase` enumerates every hkl inside a q sphere (so multiplicities come from the
symmetry of the structure itself, not from a table), groups reflections whose d-spacing
is equal for *every* lattice the crystal system allows, and keeps per group
``m |F|²`` — the intensity weight. Peak positions for other lattice parameters follow
from the metric of the crystal system (vectorised over thousands of lattices); |F|² is
evaluated at the CIF lattice (form factors change by < 0.1 % over the training ranges).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from importlib import resources

import gemmi
import numpy as np
import xraylib

from xrdscale.exceptions import InputError
from xrdscale.physics.constants import AVOGADRO, SEPARATOR, energy_kev

logger = logging.getLogger(__name__)

#: Crystal systems whose lattice we vary, with the lattice parameters a user sets.
LATTICE_KEYS = {"cubic": ("a",), "hexagonal": ("a", "c"), "trigonal": ("a", "c"), "tetragonal": ("a", "c")}

#: The 12 crystalline phases of the 18650 cell shipped with xrdscale (+ the separator peak).
BUILTIN_PHASES = ("Fe", "Cu", "Al", "NiCu", "pin", "NCA", "LiC6", "LiC12", "LiC18", "LiC30", "LiC30p", "graphite")


@dataclass(frozen=True)
class Reflections:
    """Powder reflections of a phase at one lattice.

    Attributes
    ----------
    q : ndarray (K,)
        Peak positions [1/Å], ascending.
    d : ndarray (K,)
        d-spacings [Å].
    hkl : ndarray (K, 3)
        One representative Miller index per group of equivalent reflections.
    multiplicity : ndarray (K,)
        Number of reflections in each group (Friedel pairs included).
    f2 : ndarray (K,)
        |F|² of one reflection of the group [electrons²].
    strength : ndarray (K,)
        ``multiplicity · f2 / V²`` — the lattice part of the integrated intensity.
    """

    q: np.ndarray
    d: np.ndarray
    hkl: np.ndarray
    multiplicity: np.ndarray
    f2: np.ndarray
    strength: np.ndarray


@dataclass(frozen=True)
class AmorphousPeak:
    """A non-crystalline component modelled as one pseudo-Voigt peak (e.g. the separator).

    Parameters
    ----------
    name : str
        Phase name.
    q : float
        Peak position [1/Å].
    fwhm : float
        Full width at half maximum [1/Å].
    composition : (mass_fractions, density), optional
        Element mass fractions and density [g/cm³], for attenuation
        (:func:`xrdscale.physics.attenuation.phase_composition`).
    """

    name: str
    q: float
    fwhm: float
    lattice_keys: tuple[str, ...] = ()
    composition: tuple[dict[str, float], float] | None = None


@dataclass(frozen=True, eq=False)
class Phase:
    """A crystalline phase built from a structure with gemmi.

    Use :meth:`from_cif` or :func:`builtin_phase`; the dataclass fields are internal.
    ``cell_contents`` holds the atoms per unit cell by element (occupancies included);
    ``composition`` an optional ``(mass_fractions, density)`` that replaces the
    structure's for attenuation (from a phase library's ``composition:`` entry).
    """

    name: str
    structure: gemmi.SmallStructure = field(repr=False)
    system: str
    cell_contents: dict[str, float] = field(repr=False)
    source: str = ""
    composition: tuple[dict[str, float], float] | None = field(default=None, repr=False)

    # -- pickling (gemmi structures do not pickle: a phase travels as its CIF text) ----
    def __reduce__(self) -> tuple:
        text = self.structure.make_cif_block().as_string()
        return (_phase_from_state, (self.name, text, self.system, dict(self.cell_contents), self.source,
                                    self.composition))

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_cif(cls, path: str, name: str | None = None) -> Phase:
        """Read a phase from a CIF file.

        Parameters
        ----------
        path : str
            Path or fsspec URL of the CIF.
        name : str, optional
            Phase name (default: the file's stem).

        Raises
        ------
        InputError
            The file is missing, is not a CIF, or lacks a cell, a space group or sites.
        """
        from xrdscale.io import storage

        if storage.is_remote(path):
            if not storage.exists(path):
                raise InputError(f"CIF file {path!r} does not exist; give the URL of a crystal structure (.cif)")
            text = storage.read_bytes(path).decode("utf-8", errors="replace")
        elif not os.path.isfile(path):
            raise InputError(f"CIF file {path!r} does not exist; give the path of a crystal structure (.cif)")
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        try:
            small = gemmi.make_small_structure_from_block(gemmi.cif.read_string(text).sole_block())
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"CIF file {path!r} is malformed: {exc}") from exc
        return cls._from_small(small, name or os.path.splitext(os.path.basename(path.rstrip("/")))[0], path)

    @classmethod
    def from_parameters(cls, name: str, spacegroup: str, lattice: dict[str, float],
                        sites: list[tuple[str, float, float, float, float]]) -> Phase:
        """Build a phase from a space group, lattice parameters and sites.

        Parameters
        ----------
        name : str
            Phase name.
        spacegroup : str
            Hermann–Mauguin symbol or number, e.g. ``"Fm-3m"`` or ``"166"``.
        lattice : dict
            ``a`` (and ``c`` for non-cubic systems) in Å; ``b``, ``alpha``… optional.
        sites : list of (element, x, y, z, occupancy)
            Asymmetric-unit sites in fractional coordinates.
        """
        sg = gemmi.find_spacegroup_by_name(str(spacegroup))
        if sg is None:
            raise InputError(f"unknown space group {spacegroup!r} for phase {name!r}")
        hexagonal = sg.crystal_system_str() in ("hexagonal", "trigonal")
        a = float(lattice["a"])
        cell = {"a": a, "b": float(lattice.get("b", a)), "c": float(lattice.get("c", a)),
                "alpha": lattice.get("alpha", 90.0), "beta": lattice.get("beta", 90.0),
                "gamma": lattice.get("gamma", 120.0 if hexagonal else 90.0)}
        lines = [f"data_{name}", f"_space_group_name_H-M_alt '{sg.xhm()}'"]
        lines += [f"_cell_length_{k} {cell[k]!r}" for k in ("a", "b", "c")]
        lines += [f"_cell_angle_{k} {float(cell[k])!r}" for k in ("alpha", "beta", "gamma")]
        lines += ["loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x",
                  "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy"]
        lines += [f"{el}{i + 1} {el} {x!r} {y!r} {z!r} {occ!r}" for i, (el, x, y, z, occ) in enumerate(sites)]
        small = gemmi.make_small_structure_from_block(gemmi.cif.read_string("\n".join(lines) + "\n").sole_block())
        return cls._from_small(small, name, f"{sg.xhm()} {lattice}")

    @classmethod
    def _from_small(cls, small: gemmi.SmallStructure, name: str, source: str) -> Phase:
        try:
            small.setup_cell_images()
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"structure of {name!r} ({source}) is invalid: {exc}") from exc
        sg = small.spacegroup
        problems = []
        if sg is None:
            problems.append("no space group (give _space_group_name_H-M_alt or _symmetry_space_group_name_H-M)")
        if not small.cell.is_crystal() or small.cell.a <= 0:
            problems.append("no unit cell (_cell_length_a …)")
        if len(small.sites) == 0:
            problems.append("no atom sites (_atom_site_fract_x …)")
        if problems:
            raise InputError(f"structure of {name!r} ({source}) is incomplete: " + "; ".join(problems))
        system = sg.crystal_system_str()
        if system not in LATTICE_KEYS:
            raise InputError(f"phase {name!r} is {system}; xrdscale handles cubic, tetragonal, "
                             "trigonal (hexagonal setting) and hexagonal phases")
        contents: dict[str, float] = {}
        for site in small.get_all_unit_cell_sites():
            contents[site.element.name] = contents.get(site.element.name, 0.0) + site.occ
        # gemmi sums structure factors over all symmetry images of each site: divide the
        # occupancy of sites on special positions by their multiplicity.
        small.change_occupancies_to_crystallographic()
        return cls(name=name, structure=small, system=system, cell_contents=contents, source=source)

    # -- lattice ------------------------------------------------------------------
    @property
    def spacegroup(self) -> gemmi.SpaceGroup:
        """The gemmi space group."""
        return self.structure.spacegroup

    @property
    def lattice_keys(self) -> tuple[str, ...]:
        """Lattice parameters a user can set: ``('a',)`` or ``('a', 'c')``."""
        return LATTICE_KEYS[self.system]

    @property
    def lattice(self) -> dict[str, float]:
        """The structure's own lattice parameters [Å]."""
        cell = self.structure.cell
        return {k: float(getattr(cell, k)) for k in self.lattice_keys}

    def _lattice(self, lattice: dict[str, float]) -> dict[str, float]:
        unknown = set(lattice) - set(self.lattice_keys)
        if unknown:
            raise InputError(f"phase {self.name!r} ({self.system}) has no lattice parameter(s) "
                             f"{sorted(unknown)}; it has {list(self.lattice_keys)}")
        out = self.lattice
        out.update({k: float(v) for k, v in lattice.items() if v is not None})
        return out

    def volume(self, **lattice: float) -> float:
        """Unit-cell volume [Å³] for the given (or the structure's) lattice."""
        lat = self._lattice(lattice)
        return float(cell_volume(self.system, lat["a"], lat.get("c")))

    # -- composition ----------------------------------------------------------------
    @property
    def cell_mass(self) -> float:
        """Mass of the unit cell [g/mol] (= Z · M)."""
        return sum(n * gemmi.Element(el).weight for el, n in self.cell_contents.items())

    def zmv(self, **lattice: float) -> float:
        """Z · M · V of Hill & Howard: cell mass [g/mol] × cell volume [Å³]."""
        return self.cell_mass * self.volume(**lattice)

    @property
    def mass_fractions(self) -> dict[str, float]:
        """Element → mass fraction, for attenuation coefficients (xraylib)."""
        total = self.cell_mass
        return {el: n * gemmi.Element(el).weight / total for el, n in self.cell_contents.items()}

    def density(self, **lattice: float) -> float:
        """Crystallographic density [g/cm³]."""
        return self.cell_mass / AVOGADRO / (self.volume(**lattice) * 1e-24)

    # -- reflections ------------------------------------------------------------------
    def reflections(self, wavelength: float, q_max: float, q_min: float = 0.0, **lattice: float) -> Reflections:
        """Powder reflections with ``q_min <= q <= q_max``.

        Parameters
        ----------
        wavelength : float
            X-ray wavelength [Å] (sets the energy of the anomalous correction).
        q_max, q_min : float
            q range [1/Å].
        **lattice : float
            Lattice parameters (``a``, ``c``) to use instead of the structure's.
        """
        table = self.peak_table(wavelength, q_max * 1.2 + 0.5)
        lat = self._lattice(lattice)
        q = table.q(**{k: np.asarray([v]) for k, v in lat.items()})[0]
        strength = table.f2m / self.volume(**lat) ** 2
        keep = (q >= q_min) & (q <= q_max)
        order = np.argsort(q[keep])
        sel = np.flatnonzero(keep)[order]
        mult = table.multiplicity[sel]
        return Reflections(q=q[sel], d=2 * np.pi / q[sel], hkl=table.hkl[sel], multiplicity=mult,
                           f2=table.f2m[sel] / mult, strength=strength[sel])

    def peak_table(self, wavelength: float, q_max: float) -> PeakTable:
        """Groups of equivalent reflections up to ``q_max`` (at the structure's lattice) for fast lattice changes."""
        return _peak_table(self, round(float(wavelength), 9), round(float(q_max), 6))


@dataclass(frozen=True)
class PeakTable:
    """Reflection groups of a phase, for evaluating peak positions at many lattices at once."""

    system: str
    hkl: np.ndarray          # (K, 3) representative indices
    multiplicity: np.ndarray  # (K,)
    f2m: np.ndarray           # (K,) multiplicity · |F|²

    def q(self, a: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        """Peak positions [1/Å], shape (N, K), for N lattices ``a`` (and ``c``)."""
        h, k, ell = (self.hkl[:, i].astype(float) for i in range(3))
        a = np.asarray(a, dtype=float)[:, None]
        c = a if c is None else np.asarray(c, dtype=float)[:, None]
        if self.system == "cubic":
            inv_d2 = (h * h + k * k + ell * ell) / a**2
        elif self.system == "tetragonal":
            inv_d2 = (h * h + k * k) / a**2 + ell * ell / c**2
        else:  # hexagonal axes (trigonal phases in their hexagonal setting)
            inv_d2 = 4.0 / 3.0 * (h * h + h * k + k * k) / a**2 + ell * ell / c**2
        return 2.0 * np.pi * np.sqrt(inv_d2)


@functools.lru_cache(maxsize=256)
def _peak_table(phase: Phase, wavelength: float, q_max: float) -> PeakTable:
    small = phase.structure
    cell = small.cell
    sg = phase.spacegroup
    ops = sg.operations()
    d_min = 2 * np.pi / q_max
    limits = cell.get_hkl_limits(d_min)
    ranges = [np.arange(-limits[i], limits[i] + 1) for i in range(3)]
    hkl = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    inv_d2 = cell.calculate_1_d2_array(hkl.astype(np.int32))
    hkl = hkl[inv_d2 <= 1.0 / d_min**2]
    hkl = hkl[[not ops.is_systematically_absent(list(map(int, x))) for x in hkl]]

    calc = gemmi.StructureFactorCalculatorX(cell)
    energy = energy_kev(wavelength)
    for el in phase.cell_contents:
        calc.addends.set(gemmi.Element(el), float(xraylib.Fi(gemmi.Element(el).atomic_number, energy)))
    f = np.array([calc.calculate_sf_from_small_structure(small, list(map(int, x))) for x in hkl])
    f2 = np.abs(f) ** 2
    if len(f2):
        keep = f2 > 1e-8 * f2.max()
        hkl, f2 = hkl[keep], f2[keep]

    # Reflections belong together when their d is equal at any lattice of the system:
    # test equality at the structure's lattice and at an arbitrary distorted one.
    probe = PeakTable(phase.system, hkl, np.ones(len(hkl)), f2)
    lat = phase.lattice
    q0 = probe.q(np.array([lat["a"]]), np.array([lat.get("c", lat["a"])]))[0]
    q1 = probe.q(np.array([lat["a"] * 1.0123]), np.array([lat.get("c", lat["a"]) * 0.9871]))[0]
    keys = np.stack([np.round(q0, 7), np.round(q1, 7)], axis=1)
    uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    f2m = np.bincount(inverse, weights=f2, minlength=len(uniq))
    first = np.full(len(uniq), -1)
    for i, g in enumerate(inverse):
        if first[g] < 0:
            first[g] = i
    rep = hkl[first] if len(hkl) else np.zeros((0, 3), dtype=int)
    logger.debug("%s: %d reflections in %d groups up to q=%.2f", phase.name, len(hkl), len(uniq), q_max)
    return PeakTable(phase.system, rep.astype(int), counts.astype(float), f2m)


def cell_volume(system: str, a: np.ndarray | float, c: np.ndarray | float | None = None) -> np.ndarray:
    """Unit-cell volume [Å³] of a crystal system for (arrays of) lattice parameters ``a`` and ``c``."""
    a = np.asarray(a, dtype=float)
    c = a if c is None else np.asarray(c, dtype=float)
    if system == "cubic":
        return a**3
    if system == "tetragonal":
        return a * a * c
    return np.sqrt(3.0) / 2.0 * a * a * c  # hexagonal axes (trigonal phases in their hexagonal setting)


def builtin_cif(name: str) -> str:
    """Path of a CIF shipped with xrdscale (one of :data:`BUILTIN_PHASES`)."""
    if name not in BUILTIN_PHASES:
        raise InputError(f"no built-in phase {name!r}; built-in phases are {', '.join(BUILTIN_PHASES)}")
    return str(resources.files("xrdscale") / "data" / "cif" / f"{name}.cif")


@functools.lru_cache(maxsize=32)
def builtin_phase(name: str) -> Phase | AmorphousPeak:
    """One of the 13 phases of the 18650 cell (12 CIFs and the ``separator`` peak)."""
    if name == SEPARATOR.name:
        return AmorphousPeak(SEPARATOR.name, q=SEPARATOR.q, fwhm=SEPARATOR.fwhm)
    return Phase.from_cif(builtin_cif(name), name)


def _phase_from_state(name: str, cif_text: str, system: str, cell_contents: dict[str, float], source: str,
                      composition: tuple[dict[str, float], float] | None) -> Phase:
    """Rebuild a pickled :class:`Phase` from the CIF text of its structure."""
    small = gemmi.make_small_structure_from_block(gemmi.cif.read_string(cif_text).sole_block())
    return Phase(name=name, structure=small, system=system, cell_contents=cell_contents, source=source,
                 composition=composition)
