"""A simulated coin cell for absorption CT: rough buried interfaces, their projections and a scan.

:func:`coin_cell_phantom` renders a cylinder of stacked layers along ``z`` (the rotation
axis): Li anode at the bottom, the SPE membrane, the cathode on top, air around. The
anode/SPE and SPE/cathode interfaces are rough surfaces
``Z(x, y) = z0 + A sin(2π x/λ + φ) + b(x, y)`` (the second one varies along ``y``), with
``b`` seeded smooth random bumps. Voxels are rendered with their partial volume: voxel
``k`` (centred at ``z = k``, covering ``[k − ½, k + ½]``) holds the fraction
``clip(Z − (k − ½), 0, 1)`` of the lower material, and the cylinder's rim is
anti-aliased laterally by 4 × 4 supersampling. The truth heights are ``Z`` itself on these
voxel-centre coordinates, the convention of :func:`xrdscale.xcs.roughness.interface_height`.

:func:`project` takes line integrals with scikit-image's ``radon`` (an independent
projector: reconstructions use ASTRA), and :func:`simulate_scan` turns them into detector
counts with flats, darks, per-column gain errors (ring artefacts) and Poisson noise;
:func:`write_scan` writes them as an NXtomo or a plain HDF5 file.

Lateral convention (scikit-image's): the rotation axis is at pixel ``(n // 2, n // 2)`` of
the ``(y, x)`` grid and projects onto detector column ``n // 2``; a scan's
``center_offset`` moves it to column ``n // 2 + center_offset``.
"""

from __future__ import annotations

import logging
from typing import Any

import h5py
import numpy as np
from scipy import ndimage

from xrdscale import __version__
from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.xcs.roughness import COMPONENTS, roughness_ra

logger = logging.getLogger(__name__)

#: relative standard deviation of the seeded bumps, as a fraction of each interface's amplitude
BUMP_FRACTION = 0.2

#: correlation length (pixels, Gaussian σ) of the bumps
BUMP_SIGMA = 3.0


def _disc_coverage(ny: int, nx: int, radius_px: float, sub: int = 4) -> np.ndarray:
    """Fraction of every pixel inside the disc of ``radius_px`` centred at ``(ny // 2, nx // 2)``."""
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    yy = np.arange(ny)[:, None, None, None] + offs[None, None, :, None] - ny // 2
    xx = np.arange(nx)[None, :, None, None] + offs[None, None, None, :] - nx // 2
    return np.mean(yy ** 2 + xx ** 2 <= radius_px ** 2, axis=(2, 3))


def coin_cell_phantom(*, shape: tuple[int, int, int] = (40, 64, 64), radius: float = 0.42,
                      anode: tuple[float, float] = (0.0, 0.40), spe: tuple[float, float] = (0.40, 0.55),
                      amplitude: tuple[float, float] = (2.0, 1.0), wavelength: tuple[float, float] = (24.0, 32.0),
                      mu: tuple[float, float, float, float] = (0.0, 0.010, 0.022, 0.045),
                      seed: int = 0) -> dict[str, Any]:
    """A coin cell of stacked layers along ``z`` with two rough buried interfaces.

    Parameters
    ----------
    shape : (int, int, int)
        ``(z, y, x)`` voxels; ``y`` and ``x`` equal (the projections need square slices).
    radius : float
        Cylinder radius as a fraction of the lateral size (below 0.5: the cell must fit the
        circle inscribed in the slice, which scikit-image's ``radon(circle=True)`` sees).
    anode : (float, float)
        Bottom and top of the anode as fractions of the ``z`` extent (air below the bottom).
    spe : (float, float)
        Bottom and top of the SPE; its bottom must be the anode's top. The cathode fills
        the rest up to the top of the volume.
    amplitude : (float, float)
        Sinusoid amplitude (voxels) of the anode/SPE and the SPE/cathode interface.
    wavelength : (float, float)
        Their wavelengths (pixels); the first varies along ``x``, the second along ``y``.
    mu : (float, float, float, float)
        Attenuation per voxel of air, anode, SPE and cathode (line integrals in voxel-length
        units are their sums along the rays).
    seed : int
        Seed of the phases and the bumps.

    Returns
    -------
    dict
        ``volume`` (z, y, x) float32 attenuation, ``labels`` (z, y, x) int8 (by voxel
        centre), ``height`` {``"anode/spe"``, ``"cathode/spe"``: (y, x) truth heights in
        voxels}, ``ra`` {name: truth R_a in voxels over ``mask``}, ``mask`` (y, x) columns
        inside the cylinder, ``fractions`` {component: truth volume fraction of the cell's
        voxels in the masked columns, from the partial volumes}, ``mu``, ``radius_px``.

    Raises
    ------
    InputError
        Non-square slices, a cylinder that does not fit, layers out of order or crossing.
    """
    nz, ny, nx = (int(s) for s in shape)
    if ny != nx or min(nz, ny) < 4:
        raise InputError(f"the phantom needs square slices of at least 4 × 4 voxels and 4 layers, got shape {shape}")
    if not 0 < radius < 0.5:
        raise InputError(f"radius must be in (0, 0.5) of the lateral size, got {radius}")
    if not (0 <= anode[0] < anode[1] == spe[0] < spe[1] < 1):
        raise InputError(f"layers must be ordered 0 ≤ anode bottom < anode top = spe bottom < spe top < 1, got "
                         f"anode={anode} spe={spe}")
    if len(mu) != len(COMPONENTS):
        raise InputError(f"mu needs {len(COMPONENTS)} values ({', '.join(COMPONENTS)}), got {len(mu)}")
    rng = np.random.default_rng(seed)
    radius_px = radius * nx
    cover = _disc_coverage(ny, nx, radius_px)
    yy, xx = np.indices((ny, nx), dtype=np.float64)
    mask = (yy - ny // 2) ** 2 + (xx - nx // 2) ** 2 <= radius_px ** 2

    def bumps(amp: float) -> np.ndarray:
        b = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), BUMP_SIGMA, mode="wrap")
        return BUMP_FRACTION * amp * b / max(float(b.std()), 1e-12)

    def to_z(frac: float) -> float:
        return frac * nz - 0.5

    phases = rng.uniform(0.0, 2.0 * np.pi, size=2)
    z1 = to_z(anode[1]) + amplitude[0] * np.sin(2 * np.pi * xx / wavelength[0] + phases[0]) + bumps(amplitude[0])
    z2 = to_z(spe[1]) + amplitude[1] * np.sin(2 * np.pi * yy / wavelength[1] + phases[1]) + bumps(amplitude[1])
    z0 = to_z(anode[0])
    thin = float(np.min((z2 - z1)[mask]))
    if thin < 1.0:
        raise InputError(f"the SPE is {thin:.2f} voxels thin somewhere: the interfaces nearly cross; lower the "
                         "amplitudes or thicken the SPE")
    if float(np.min(z1[mask])) < z0 + 1 or float(np.max(z2[mask])) > nz - 1.5:
        raise InputError("an interface leaves the anode or the cathode less than a voxel thick; lower the "
                         "amplitudes or move the layers")
    k = np.arange(nz, dtype=np.float64)[:, None, None]

    def below(h: np.ndarray | float) -> np.ndarray:
        return np.clip(np.asarray(h) - (k - 0.5), 0.0, 1.0)

    f0, f1, f2 = below(z0), below(z1[None]), below(z2[None])
    mu_air, mu_a, mu_s, mu_c = (float(m) for m in mu)
    cell = mu_air * f0 + mu_a * (f1 - f0) + mu_s * (f2 - f1) + mu_c * (1.0 - f2)
    volume = (cover * cell + (1.0 - cover) * mu_air).astype(np.float32)
    labels = np.where(k < z0, 0, np.where(k < z1, 1, np.where(k < z2, 2, 3))).astype(np.int8)
    labels = np.where(mask[None], labels, 0).astype(np.int8)
    heights = {"anode/spe": z1, "cathode/spe": z2}
    ra = {name: roughness_ra(h, mask=mask) for name, h in heights.items()}
    thick = np.stack([(z1 - z0), (z2 - z1), (nz - 0.5 - z2)])[:, mask]
    cell_len = float(np.sum(thick))
    fractions = {"air": 0.0, **{c: float(np.sum(t)) / cell_len for c, t in zip(COMPONENTS[1:], thick, strict=True)}}
    logger.debug("coin cell phantom %s: R_a %s", shape, ra)
    return {"volume": volume, "labels": labels, "height": heights, "ra": ra, "mask": mask, "fractions": fractions,
            "mu": tuple(float(m) for m in mu), "radius_px": radius_px}


def project(volume: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Parallel-beam line integrals of every ``z`` slice with :func:`skimage.transform.radon`.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(z, y, x)`` attenuation per voxel, ``y = x``; zero outside the inscribed circle.
    angles_deg : numpy.ndarray
        Projection angles in degrees (scikit-image's ``theta``).

    Returns
    -------
    numpy.ndarray
        ``(angle, z, col)`` float32 line integrals (voxel-length units), the rotation axis
        on column ``n // 2``.
    """
    from skimage.transform import radon

    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3 or volume.shape[1] != volume.shape[2]:
        raise InputError(f"project needs a (z, y, x) volume of square slices, got shape {volume.shape}")
    theta = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    n = volume.shape[1]
    out = np.empty((theta.size, volume.shape[0], n), dtype=np.float32)
    for z in range(volume.shape[0]):
        out[:, z, :] = radon(volume[z], theta=theta, circle=True).T
    return out


def simulate_scan(phantom: dict[str, Any], *, n_angles: int = 180, flat_counts: float = 2e4, rings: float = 0.02,
                  ring_fraction: float = 0.1, noise: bool = True, center_offset: float = 0.0, seed: int = 0,
                  n_flats: int = 10, n_darks: int = 5, dark_counts: float = 100.0) -> dict[str, Any]:
    """Detector frames of a 360° scan of ``phantom``: counts with flats, darks and ring errors.

    ``I = D + F · g · u · exp(−p)`` per detector pixel, with ``p`` the line integrals
    (:func:`project`), ``F`` a smooth beam profile of ``flat_counts``, ``g`` the gain of
    every column (``1 + rings · N(0, 1)`` on a random ``ring_fraction`` of the columns,
    1 elsewhere; the flats carry it, so flat-field correction removes it) and ``u`` a gain
    drift between flats and projections on the same columns (``1 + rings/2 · N(0, 1)``,
    not in the flats: the ring error left for ring removal), ``D`` the dark current.

    Parameters
    ----------
    phantom : dict
        :func:`coin_cell_phantom`'s result (its ``volume``).
    n_angles : int
        Projections over [0°, 360°), endpoint excluded.
    flat_counts : float
        Mean counts of the open beam.
    rings : float
        Relative gain error of the faulty columns.
    ring_fraction : float
        Fraction of faulty columns.
    noise : bool
        Poisson counting noise (frames are then uint16 counts; float32 expectations without).
    center_offset : float
        Shift of the rotation axis on the detector, in columns.
    seed : int
        Seed of the gains and the noise.
    n_flats, n_darks : int
        Number of flat and dark frames.
    dark_counts : float
        Mean dark counts.

    Returns
    -------
    dict
        ``projections`` (angle, row, col), ``flats`` (n, row, col), ``darks`` (n, row, col),
        ``angles_deg`` (angle,), and ``center``: the true axis column
        ``n // 2 + center_offset``.
    """
    volume = np.asarray(phantom["volume"])
    if n_angles < 2:
        raise InputError(f"n_angles must be at least 2, got {n_angles}")
    if not 0 <= ring_fraction <= 1:
        raise InputError(f"ring_fraction must be in [0, 1], got {ring_fraction}")
    rng = np.random.default_rng(seed)
    angles = np.arange(n_angles, dtype=np.float64) * 360.0 / n_angles
    line = project(volume, angles)
    n_rows, n_col = line.shape[1:]
    if center_offset:
        if abs(center_offset) > n_col / 8:
            raise InputError(f"center_offset {center_offset} is too large for {n_col} columns (at most {n_col / 8})")
        line = ndimage.shift(line, (0.0, 0.0, float(center_offset)), order=3, mode="constant", cval=0.0)
    gain = np.ones(n_col)
    drift = np.ones(n_col)
    bad = rng.choice(n_col, size=int(round(ring_fraction * n_col)), replace=False)
    gain[bad] += rings * np.clip(rng.standard_normal(bad.size), -3, 3)
    drift[bad] += 0.5 * rings * np.clip(rng.standard_normal(bad.size), -3, 3)
    rows = np.linspace(-1.0, 1.0, n_rows)[:, None]
    cols = np.linspace(-1.0, 1.0, n_col)[None, :]
    beam = flat_counts * (1.0 + 0.05 * np.cos(1.3 * rows + 0.4)) * (1.0 - 0.08 * cols ** 2)
    flat_mean = beam * gain
    proj_mean = dark_counts + flat_mean[None] * drift[None, None] * np.exp(-line.astype(np.float64))

    def frames(mean: np.ndarray, n: int | None) -> np.ndarray:
        m = np.broadcast_to(mean, (n, *mean.shape)) if n is not None else mean
        if not noise:
            return np.asarray(m, dtype=np.float32)
        return np.clip(rng.poisson(m), 0, np.iinfo(np.uint16).max).astype(np.uint16)

    scan = {"projections": frames(proj_mean, None), "flats": frames(dark_counts + flat_mean, n_flats),
            "darks": frames(np.full((n_rows, n_col), dark_counts), n_darks), "angles_deg": angles,
            "center": float(n_col // 2 + center_offset)}
    logger.debug("simulated %d projections of %d × %d pixels (%d ring columns)", n_angles, n_rows, n_col, bad.size)
    return scan


def write_scan(url: str, scan: dict[str, Any], *, layout: str = "nxtomo") -> str:
    """Write a scan (:func:`simulate_scan`) as an HDF5 file at ``url``.

    Parameters
    ----------
    url : str
        Destination (local path or fsspec URL); written through a staged temporary file.
    scan : dict
        ``projections``, ``flats``, ``darks`` (optional), ``angles_deg``; ``pixel_size_um``
        optional.
    layout : {"nxtomo", "plain"}
        ``nxtomo``: ``entry/instrument/detector/data`` with ``image_key`` (darks, flats,
        projections in that order), ``entry/sample/rotation_angle`` (deg) and an
        ``entry/data`` NXdata linking them. ``plain``: root datasets ``projections``,
        ``flats``, ``darks`` and ``angles``.

    Returns
    -------
    str
        ``url``.
    """
    if layout not in ("nxtomo", "plain"):
        raise InputError(f"unknown layout {layout!r}; expected 'nxtomo' or 'plain'")
    proj = np.asarray(scan["projections"])
    flats = None if scan.get("flats") is None else np.asarray(scan["flats"])
    darks = None if scan.get("darks") is None else np.asarray(scan["darks"])
    angles = np.asarray(scan["angles_deg"], dtype=np.float64)
    pixel = scan.get("pixel_size_um")
    with storage.staged(url) as local, h5py.File(local, "w") as f:
        f.attrs["creator"] = f"xrdscale {__version__}"
        if layout == "plain":
            f.create_dataset("projections", data=proj, chunks=(1, *proj.shape[1:]))
            if flats is not None:
                f.create_dataset("flats", data=flats)
            if darks is not None:
                f.create_dataset("darks", data=darks)
            f.create_dataset("angles", data=angles).attrs["units"] = "deg"
            if pixel is not None:
                f.attrs["pixel_size_um"] = float(pixel)
            return url
        parts = [(a, k) for a, k in ((darks, 2), (flats, 1), (proj, 0)) if a is not None]
        data = np.concatenate([a for a, _ in parts]).astype(proj.dtype)
        key = np.concatenate([np.full(a.shape[0], k, dtype=np.uint8) for a, k in parts])
        rot = np.concatenate([np.zeros(a.shape[0]) if k else angles for a, k in parts])
        entry = f.create_group("entry")
        entry.attrs.update({"NX_class": "NXentry", "default": "data"})
        entry.create_dataset("definition", data="NXtomo")
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        det = instrument.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det.create_dataset("data", data=data, chunks=(1, *data.shape[1:]))
        det.create_dataset("image_key", data=key)
        if pixel is not None:
            for ax in ("x_pixel_size", "y_pixel_size"):
                det.create_dataset(ax, data=float(pixel) * 1e-6).attrs["units"] = "m"
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        sample.create_dataset("rotation_angle", data=rot).attrs["units"] = "degree"
        nxdata = entry.create_group("data")
        nxdata.attrs.update({"NX_class": "NXdata", "signal": "data"})
        nxdata["data"] = h5py.SoftLink("/entry/instrument/detector/data")
        nxdata["image_key"] = h5py.SoftLink("/entry/instrument/detector/image_key")
        nxdata["rotation_angle"] = h5py.SoftLink("/entry/sample/rotation_angle")
    return url


def truth_url(url: str) -> str:
    """Where :func:`write_phantom` puts the truth of the scan at ``url``: ``<stem>.truth.h5`` beside it."""
    for ext in (".nxs", ".h5", ".hdf5", ".hdf", ".nx"):
        if url.lower().endswith(ext):
            return url[: -len(ext)] + ".truth.h5"
    return url + ".truth.h5"


def write_phantom(url: str, *, shape: tuple[int, int, int] = (40, 64, 64), n_angles: int = 180, rings: float = 0.02,
                  seed: int = 0, layout: str = "nxtomo", **phantom_kw: Any) -> list[str]:
    """Simulate a coin cell's scan and write it (``url``) and its truth (:func:`truth_url`).

    Parameters
    ----------
    url : str
        The projections file to write (NXtomo by default, see :func:`write_scan`).
    shape, seed, **phantom_kw
        As :func:`coin_cell_phantom` (``seed`` also seeds the scan).
    n_angles, rings
        As :func:`simulate_scan`.
    layout : {"nxtomo", "plain"}
        Layout of the projections file.

    Returns
    -------
    list of str
        ``[url, truth url]``. The truth file holds ``volume``, ``labels``, ``mask``,
        ``height/anode_spe`` and ``height/cathode_spe`` (voxels), with attributes ``ra_*``
        (voxels), ``center`` (the axis column) and ``fraction_*``.
    """
    phantom = coin_cell_phantom(shape=shape, seed=seed, **phantom_kw)
    scan = simulate_scan(phantom, n_angles=n_angles, rings=rings, seed=seed)
    write_scan(url, scan, layout=layout)
    target = truth_url(url)
    with storage.staged(target) as local, h5py.File(local, "w") as f:
        f.attrs["creator"] = f"xrdscale {__version__}"
        f.create_dataset("volume", data=phantom["volume"], compression="gzip")
        f.create_dataset("labels", data=phantom["labels"], compression="gzip")
        f.create_dataset("mask", data=phantom["mask"].astype(np.uint8))
        for name, h in phantom["height"].items():
            key = name.replace("/", "_")
            f.create_dataset(f"height/{key}", data=h)
            f.attrs[f"ra_{key}"] = phantom["ra"][name]
        for comp, frac in phantom["fractions"].items():
            f.attrs[f"fraction_{comp}"] = frac
        f.attrs["center"] = scan["center"]
    logger.info("wrote a coin-cell scan to %s and its truth to %s", storage.redact(url), storage.redact(target))
    return [url, target]
