"""Zero-order self-absorption: flat map of an absorbing disk, μ from xraylib, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import xraylib

from _builders import write_sinogram
from xrdscale.io import storage
from xrdscale.stages.absorption import correct_absorption, mass_attenuation, mu_from_fractions, transmission
from xrdscale.exceptions import InputError
from xrdscale.recon.geometry import Geometry
from xrdscale.stages.reconstruct import reconstruct

N, A, STEP = 64, 90, 0.03
R = 24.0  # disk radius in pixels


def absorbing_disk_sinogram(mu_mm: float, two_theta_deg: float = 3.0, n_azimuth: int = 16) -> np.ndarray:
    """Sinogram of a uniformly scattering cylinder (density 1, axis along the rotation axis)
    with attenuation of the incoming path to each point and of the outgoing path along the
    Debye-Scherrer cone at 2θ, averaged over the ring's azimuth as azimuthal integration
    does — integrated numerically: an independent model, not the correction's own."""
    t = np.arange(N) - (N - 1) / 2.0
    mu_px = mu_mm * STEP
    tt = np.deg2rad(two_theta_deg)
    profile = np.zeros(N)
    for j, tj in enumerate(t):
        if abs(tj) >= R:
            continue
        half = np.sqrt(R ** 2 - tj ** 2)
        s = np.linspace(-half, half, 4001)
        l_in = s + half
        weights = np.zeros_like(s)
        for phi in (np.arange(n_azimuth) + 0.5) * 2 * np.pi / n_azimuth:
            # in-plane part of the outgoing direction (along the ray, across it) and its length
            d = np.array([np.cos(tt), np.sin(tt) * np.cos(phi)])
            norm = np.hypot(*d)
            d /= norm
            b = s * d[0] + tj * d[1]
            l_plane = -b + np.sqrt(b ** 2 - (s ** 2 + tj ** 2 - R ** 2))  # to the cylinder wall
            weights += np.exp(-mu_px * (l_in + l_plane / norm)) / n_azimuth
        profile[j] = np.trapezoid(weights, s)
    return np.repeat(profile[None, :], A, axis=0)


def disk_fraction() -> np.ndarray:
    """Area fraction of each pixel inside the disk (8 × 8 supersampling), as phase maps give it."""
    c = (np.arange(N * 8) - (N * 8 - 1) / 2.0) / 8
    y, x = np.meshgrid(c, c, indexing="ij")
    return (x ** 2 + y ** 2 <= R ** 2).reshape(N, 8, N, 8).mean(axis=(1, 3))


def disk_mask(shrink: float = 0.0) -> np.ndarray:
    c = np.arange(N) - (N - 1) / 2.0
    y, x = np.meshgrid(c, c, indexing="ij")
    return x ** 2 + y ** 2 <= (R - shrink) ** 2


def spread(img: np.ndarray, mask: np.ndarray) -> float:
    v = img[mask]
    return float((np.percentile(v, 95) - np.percentile(v, 5)) / np.median(v))


def test_correction_flattens_a_strongly_absorbing_disk(tmp_path):
    mu_mm = 1.5  # transmission through the diameter: exp(-1.5 * 1.44) ≈ 0.12
    sino = np.stack([absorbing_disk_sinogram(mu_mm), 2 * absorbing_disk_sinogram(mu_mm)], axis=-1)
    angles = np.arange(A) * 180.0 / A
    url = write_sinogram(str(tmp_path / "sino.zarr"), sino, angles, step_mm=STEP)
    mu_map = mu_mm * disk_fraction()
    corrected = correct_absorption(url, str(tmp_path / "abs.zarr"), mu_map=mu_map)
    raw = storage.open_store(reconstruct(url, str(tmp_path / "raw.zarr")), stage="volume")["intensity"].values
    fixed = storage.open_store(reconstruct(corrected, str(tmp_path / "fixed.zarr")),
                               stage="volume")["intensity"].values
    inside = disk_mask(shrink=3.0)
    for c in range(2):
        assert spread(raw[:, :, c], inside) > 0.3  # the uncorrected map is cupped
        assert spread(fixed[:, :, c], inside) <= 0.05
        assert abs(np.median(fixed[:, :, c][inside]) - (c + 1)) < 0.05 * (c + 1)  # density 1 (and 2) back


def test_mu_from_fractions_matches_xraylib_compound():
    # a voxel full of Cu (volume fraction 1): μ = ρ (μ/ρ) — compare with xraylib's compound parser
    rho = 8.96
    mu = mu_from_fractions({"Cu": np.ones((2, 2))}, energy_kev=95.0,
                           composition={"Cu": ({"Cu": 1.0}, rho)})
    np.testing.assert_allclose(mu, rho * xraylib.CS_Total_CP("Cu", 95.0) / 10.0, rtol=0.02)
    # weight basis: half Cu / half Al by mass, packing 1
    w = mu_from_fractions({"Cu": np.full((1, 1), 0.5), "Al": np.full((1, 1), 0.5)}, energy_kev=95.0,
                          basis="weight", composition={"Cu": ({"Cu": 1.0}, 8.96), "Al": ({"Al": 1.0}, 2.70)})
    rho_mix = 1.0 / (0.5 / 8.96 + 0.5 / 2.70)
    expected = rho_mix * (0.5 * xraylib.CS_Total_Kissel(29, 95.0) + 0.5 * xraylib.CS_Total_Kissel(13, 95.0)) / 10
    np.testing.assert_allclose(w, expected, rtol=0.02)


def test_builtin_phase_attenuation_is_physical():
    # NCA (LiNi0.8Co0.15Al0.05O2-like) attenuates less than Cu per mass at 95 keV, more than graphite
    from xrdscale.stages.absorption import phase_composition

    mu_rho = {p: mass_attenuation(phase_composition(p)[0], 95.0) for p in ("Cu", "NCA", "graphite")}
    assert mu_rho["graphite"] < mu_rho["NCA"] < mu_rho["Cu"]


def test_transmission_of_a_uniform_disk_is_exp_of_chord():
    g = Geometry(tuple(np.arange(A) * 180.0 / A), N, STEP)
    trans = transmission(disk_fraction(), g)
    t = np.arange(N) - (N - 1) / 2.0
    chord_mm = 2 * np.sqrt(np.clip(R ** 2 - t ** 2, 0, None)) * STEP
    inner = np.abs(t) < R - 2
    np.testing.assert_allclose(trans[:, inner], np.exp(-chord_mm[inner])[None, :].repeat(A, 0), rtol=0.03)


def test_mismatched_mu_map_is_refused_and_nothing_complete(tmp_path):
    sino = np.ones((A, N, 2))
    url = write_sinogram(str(tmp_path / "sino.zarr"), sino, np.arange(A) * 180.0 / A)
    out = str(tmp_path / "abs.zarr")
    with pytest.raises(InputError, match=r"shape \(32, 32\).*\(64, 64\)"):
        correct_absorption(url, out, mu_map=np.zeros((32, 32)))
    assert not storage.exists(out)


def test_cli_absorption_mismatch_exits_nonzero(tmp_path):
    from typer.testing import CliRunner

    from xrdscale.cli import app

    url = write_sinogram(str(tmp_path / "sino.zarr"), np.ones((A, N, 2)), np.arange(A) * 180.0 / A)
    mu_path = str(tmp_path / "mu.npy")
    np.save(mu_path, np.zeros((10, 10)))
    res = CliRunner().invoke(app, ["absorption", url, str(tmp_path / "abs.zarr"), "--mu-map", mu_path])
    assert res.exit_code != 0
    np.save(mu_path, np.full((N, N), 0.1))
    res = CliRunner().invoke(app, ["absorption", url, str(tmp_path / "abs.zarr"), "--mu-map", mu_path])
    assert res.exit_code == 0, res.output
    assert storage.is_complete(str(tmp_path / "abs.zarr"))
