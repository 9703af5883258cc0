"""Absorption CT of a coin cell: reading, ring removal, centre, ASTRA FBP, interfaces and roughness.

The end-to-end tests run a simulated cell (:mod:`xrdscale.xcs.phantom`, projected with
scikit-image's radon, an independent projector) through an NXtomo file, the reader, ring
removal and ASTRA, and compare the interface height maps, R_a and volume fractions with
the phantom's truth.
"""

from __future__ import annotations

import pickle

import dask.array as da
import h5py
import numpy as np
import pytest
from scipy import ndimage

from xrdscale.exceptions import ConfigError, InputError
from xrdscale.xcs import ct, phantom, roughness

ROI = (14, 50, 14, 50)          # lateral region of interest of the 64 × 64 phantom, away from the rim
NAMES = ("anode/spe", "cathode/spe")


@pytest.fixture(scope="module")
def cell():
    return phantom.coin_cell_phantom()


@pytest.fixture(scope="module")
def nxtomo(cell, tmp_path_factory):
    scan = phantom.simulate_scan(cell, n_angles=180, seed=1)
    url = str(tmp_path_factory.mktemp("ct") / "cell.nxs")
    phantom.write_scan(url, scan, layout="nxtomo")
    return url, scan


def _crop(a: np.ndarray, roi=ROI) -> np.ndarray:
    y0, y1, x0, x1 = roi
    return a[..., y0:y1, x0:x1]


def _check_heights(result: dict, cell: dict, rms_max: float = 1.0, ra_tol: float = 0.10) -> dict:
    out = {}
    for name in NAMES:
        truth = _crop(cell["height"][name])
        got = result["height"][name]
        assert np.isfinite(got).all(), f"{name}: interface not found in {np.isnan(got).sum()} columns"
        rms = float(np.sqrt(np.mean((got - truth) ** 2)))
        ra_truth = roughness.roughness_ra(truth)
        assert rms < rms_max, f"{name}: height RMS error {rms:.3f} voxels"
        assert result["ra_um"][name] == pytest.approx(ra_truth, rel=ra_tol), name
        out[name] = (rms, ra_truth, result["ra_um"][name])
    return out


# -- end to end -------------------------------------------------------------------------


def test_nxtomo_scan_reconstructs_the_interfaces_and_their_roughness(cell, nxtomo):
    url, scan = nxtomo
    proj = ct.open_projections(url)
    assert proj.shape == scan["projections"].shape
    assert proj.meta["layout"] == "nxtomo"
    volume = ct.reconstruct_block(proj, 0, proj.shape[1], rings="all", center=scan["center"])
    assert volume.shape == (40, 64, 64) and volume.dtype == np.float32
    # attenuation per voxel, the phantom's own units
    inside = cell["mask"] & (np.hypot(*np.indices((64, 64)) - 32.0) < 22)
    assert np.median(volume[-5:, inside]) == pytest.approx(cell["mu"][3], rel=0.03)
    result = roughness.analyse_volume(volume, roi=ROI)
    assert result["order"] == "anode-bottom"
    _check_heights(result, cell)
    truth = roughness.volume_fractions(_crop(cell["labels"]))
    for comp in ("anode", "spe", "cathode"):
        assert result["fractions"][comp] == pytest.approx(truth[comp], abs=0.02), comp


def test_shifted_axis_is_found_and_reconstructs_the_heights(cell, tmp_path):
    scan = phantom.simulate_scan(cell, n_angles=180, center_offset=2.3, seed=2)
    url = phantom.write_scan(str(tmp_path / "shifted.h5"), scan, layout="plain")
    proj = ct.open_projections(url, chunk_rows=16)
    assert proj.meta["layout"] == "plain"
    center = ct.estimate_center(proj)
    assert abs(center - scan["center"]) < 0.5, center
    assert abs(center - (64 - 1) / 2) > 2        # not just the detector centre
    result = roughness.analyse_volume(ct.reconstruct_block(proj, 0, 40, center=center), roi=ROI)
    _check_heights(result, cell)


def test_block_finds_its_own_center_and_180_degree_scans_work(cell):
    """reconstruct_block without a centre finds it on its rows; a 180° scan falls back to find_center_vo."""
    scan = phantom.simulate_scan(cell, n_angles=120, center_offset=-1.6, seed=3)
    proj = ct.Projections(data=da.from_array(scan["projections"], chunks=(-1, 8, -1)), flats=scan["flats"],
                          darks=scan["darks"], angles_deg=scan["angles_deg"])
    sinos = ct.sinograms_of(proj, 26, 34)
    assert abs(ct.find_center(sinos.mean(axis=0), scan["angles_deg"]) - scan["center"]) < 0.5
    half = scan["angles_deg"] < 180
    c180 = ct.find_center(sinos.mean(axis=0)[half], scan["angles_deg"][half])
    assert abs(c180 - scan["center"]) < 1.0
    vol = ct.reconstruct_block(proj, 30, 34)
    truth = cell["volume"][30:34]
    assert np.sqrt(np.mean(_crop(vol - truth) ** 2)) < 0.1 * cell["mu"][3]


# -- ring removal -------------------------------------------------------------------------


def _ring_amplitude(volume: np.ndarray, radius: float) -> float:
    """RMS of the azimuthal-mean radial profile minus its median-smoothed self (rings), per slice."""
    n = volume.shape[-1]
    r = np.hypot(*(np.indices((n, n)) - n // 2))
    bins = np.round(r).astype(int)
    out = []
    for sl in volume:
        prof = ndimage.mean(sl, bins, index=np.arange(int(radius) - 4))
        out.append(np.sqrt(np.mean((prof - ndimage.median_filter(prof, 7, mode="nearest"))[3:] ** 2)))
    return float(np.mean(out))


def _stripe_amplitude(sinos: np.ndarray) -> float:
    """RMS of the column means over angles minus their median-filtered version."""
    m = sinos.mean(axis=1)
    return float(np.sqrt(np.mean((m - ndimage.median_filter(m, (1, 5), mode="nearest")) ** 2)))


def test_ring_removal_lowers_the_rings():
    # a realistic 115 keV transmission (≥ 80 %) through homogeneous cathode slices
    cell = phantom.coin_cell_phantom(shape=(8, 64, 64), anode=(0.0, 0.25), spe=(0.25, 0.5), amplitude=(0.0, 0.0),
                                     mu=(0.0, 0.001, 0.002, 0.0045))
    scan = phantom.simulate_scan(cell, n_angles=180, rings=0.05, seed=4)
    proj = ct.Projections(data=da.from_array(scan["projections"]), flats=scan["flats"], darks=scan["darks"],
                          angles_deg=scan["angles_deg"])
    amp = {}
    stripes = {}
    for method in ("none", "all"):
        vol = ct.reconstruct_block(proj, 5, 8, rings=method, center=scan["center"])
        amp[method] = _ring_amplitude(vol, cell["radius_px"])
        s = ct.sinograms_of(proj, 5, 8)
        stripes[method] = _stripe_amplitude(np.stack([ct.remove_rings(x, method=method) for x in s]))
    assert amp["all"] < 0.7 * amp["none"], amp
    assert stripes["all"] < 0.5 * stripes["none"], stripes


def test_remove_rings_clamps_its_windows_and_checks_its_method(rng):
    sino = rng.normal(1.0, 0.01, (30, 16)).astype(np.float32)
    sino[:, 7] += 0.2
    out = ct.remove_rings(sino, method="all")
    assert out.shape == sino.shape and out.dtype == np.float32
    assert abs(out[:, 7].mean() - 1.0) < abs(sino[:, 7].mean() - 1.0) / 4
    assert ct.ring_sizes(16) == (3, 3)
    assert ct.ring_sizes(2560) == (61, 21)
    np.testing.assert_array_equal(ct.remove_rings(sino, method="none"), sino)
    noise_free = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (30, 1))
    assert np.isfinite(ct.remove_rings(noise_free)).all()      # algotom refuses noise-free data: sorting fallback
    with pytest.raises(ConfigError, match="ring removal"):
        ct.remove_rings(sino, method="fft")


# -- geometry -------------------------------------------------------------------------------


def test_orientation_and_scale_match_scikit_image():
    from skimage.transform import radon

    n = 64
    img = np.zeros((n, n))
    img[10:16, 40:50] = 1.0            # an asymmetric object: no flip or transpose maps it onto itself
    img[44:48, 14:34] = 0.5
    for angles in (np.arange(0, 360, 2.0), np.arange(0, 180, 1.0)):
        sino = radon(img, theta=angles, circle=True).T
        rec = ct.reconstruct_slices(sino[None], angles, center=n // 2)[0]
        corr = {name: float(np.corrcoef(rec.ravel(), im.ravel())[0, 1])
                for name, im in (("same", img), ("flipud", img[::-1]), ("fliplr", img[:, ::-1]), ("T", img.T))}
        assert corr["same"] > 0.95, corr
        assert max(v for k, v in corr.items() if k != "same") < 0.3, corr
        assert rec[11:15, 41:49].mean() == pytest.approx(1.0, abs=0.08)
    # pixel size: the same volume in 1/µm
    per_um = ct.reconstruct_slices(sino[None], angles, center=n // 2, pixel_size_um=2.0)[0]
    np.testing.assert_allclose(per_um, rec / 2.0, rtol=1e-5, atol=1e-7)


def test_reconstruct_checks_its_input():
    sino = np.zeros((1, 10, 32), dtype=np.float32)
    with pytest.raises(InputError, match="angles"):
        ct.reconstruct_slices(sino, np.arange(9.0))
    with pytest.raises(InputError, match="center"):
        ct.reconstruct_slices(sino, np.arange(10.0), center=30.0)
    with pytest.raises(ConfigError, match="filter"):
        ct.reconstruct_slices(sino, np.arange(10.0), filter_name="wiener")
    with pytest.raises(ConfigError, match="device"):
        ct.reconstruct_slices(sino, np.arange(10.0), device="tpu")


# -- reading ---------------------------------------------------------------------------------


def test_projections_are_lazy_row_chunks_that_pickle(nxtomo):
    url, scan = nxtomo
    proj = ct.open_projections(url, chunk_rows=8)
    assert isinstance(proj.data, da.Array)
    assert proj.data.chunks[1] == (8,) * 5 and proj.data.chunks[0] == (180,)
    clone = pickle.loads(pickle.dumps(proj))
    np.testing.assert_array_equal(clone.read_rows(9, 13), scan["projections"][:, 9:13])
    np.testing.assert_array_equal(proj.flats, scan["flats"])
    np.testing.assert_allclose(proj.angles_deg, scan["angles_deg"])
    small = proj.averaged()
    assert small.flats is not None and small.flats.shape == (1, 40, 64)
    np.testing.assert_allclose(ct.sinograms_of(small, 3, 5), ct.sinograms_of(proj, 3, 5), rtol=1e-5, atol=1e-6)


def test_normalize_is_minus_log_of_the_flat_dark_corrected_transmission():
    flats = np.full((3, 2, 4), 1100.0)
    darks = np.full((2, 2, 4), 100.0)
    block = np.full((5, 2, 4), 100.0 + 1000.0 * np.exp(-0.7))
    block[0, 0, 0] = 0.0                                   # below the dark: clipped
    out = ct.normalize(block, flats, darks)
    assert out.dtype == np.float32 and out.shape == block.shape
    np.testing.assert_allclose(out[1:], 0.7, rtol=1e-5)
    assert out[0, 0, 0] == pytest.approx(-np.log(1e-3), rel=1e-5)
    np.testing.assert_allclose(ct.normalize(block[1:] - 100.0, flats - 100.0, None), 0.7, rtol=1e-5)
    with pytest.raises(InputError, match="flats"):
        ct.normalize(block, flats[:, :1], darks)


def _nxtomo_without_flats(path, scan):
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        det = entry.create_group("instrument/detector")
        det.create_dataset("data", data=scan["projections"])
        det.create_dataset("image_key", data=np.zeros(len(scan["angles_deg"]), dtype=np.uint8))
        entry.create_dataset("sample/rotation_angle", data=scan["angles_deg"])
    return str(path)


def test_bad_files_are_refused_with_what_to_do(cell, tmp_path):
    scan = phantom.simulate_scan(cell, n_angles=12, seed=5)
    no_flats = _nxtomo_without_flats(tmp_path / "noflats.nxs", scan)
    with pytest.raises(InputError, match="no flat fields.*pass flats from another file"):
        ct.open_projections(no_flats)
    # … and flats from another file fix it
    flats_url = phantom.write_scan(str(tmp_path / "flats.h5"), {**scan, "projections": scan["flats"]}, layout="plain")
    proj = ct.open_projections(no_flats, flats=flats_url, darks=scan["darks"])
    np.testing.assert_array_equal(proj.flats, scan["flats"])
    with pytest.raises(InputError, match="flats.*shape"):
        ct.open_projections(no_flats, flats=scan["flats"][:, :, :10])
    bad_angles = phantom.write_scan(str(tmp_path / "angles.h5"), {**scan, "angles_deg": scan["angles_deg"][:-1]},
                                    layout="plain")
    with pytest.raises(InputError, match="11 values for 12 projections"):
        ct.open_projections(bad_angles)
    nx = phantom.write_scan(str(tmp_path / "nx.nxs"), scan)
    with h5py.File(nx, "a") as f:
        del f["entry/sample/rotation_angle"]
        f["entry/sample/rotation_angle"] = np.arange(5.0)
    with pytest.raises(InputError, match="rotation_angle has 5 values"):
        ct.open_projections(nx)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((3, 4, 4))
    with pytest.raises(InputError, match="neither an NXtomo.*images"):
        ct.open_projections(str(other))
    with pytest.raises(InputError, match="no file"):
        ct.open_projections(str(tmp_path / "missing.h5"))


# -- interfaces and roughness ------------------------------------------------------------------


@pytest.mark.parametrize("height", [15.5, 16.0, 16.25, 16.8])
def test_flat_interface_truth_and_extraction_agree(height):
    cell = phantom.coin_cell_phantom(amplitude=(0.0, 0.0), anode=(0.0, (height + 0.5) / 40), spe=(
        (height + 0.5) / 40, 0.6))
    assert np.allclose(cell["height"]["anode/spe"], height)
    labels, _ = roughness.segment(cell["volume"])
    inside = _crop(np.ones((64, 64), bool))
    z = roughness.interface_height(cell["volume"], labels, 1, 2)
    assert np.max(np.abs(_crop(z) - height)[inside]) < 0.05
    linear = roughness.interface_height(cell["volume"], labels, 1, 2, method="linear")
    if height * 2 == round(height * 2):            # linear interpolation is exact on (half-)integers only
        assert np.max(np.abs(_crop(linear) - height)) < 0.05


def test_interface_height_is_nan_without_the_interface():
    vol = np.zeros((6, 3, 3), dtype=np.float32)
    labels = np.zeros(vol.shape, dtype=np.int8)
    assert np.isnan(roughness.interface_height(vol, labels, 1, 2)).all()
    labels[:3] = 1
    labels[3:, 0] = 2
    vol[:3], vol[3:] = 1.0, 2.0
    z = roughness.interface_height(vol, labels, 1, 2)
    assert np.allclose(z[0], 2.5) and np.isnan(z[1:]).all()


def test_ra_of_a_sinusoid_a_tilted_plane_and_the_gaussian_cutoff():
    x = np.arange(480.0)
    yy, xx = np.meshgrid(np.arange(40.0), x, indexing="ij")
    amp = 1.7
    sine = amp * np.sin(2 * np.pi * xx / 48.0)           # ten full periods
    assert roughness.roughness_ra(sine) == pytest.approx(2 * amp / np.pi, rel=0.01)
    assert roughness.roughness_rq(sine) == pytest.approx(amp / np.sqrt(2), rel=0.01)
    assert roughness.roughness_ra(sine, pixel_size=0.5) == pytest.approx(amp / np.pi, rel=0.01)
    tilted = 3.0 + 0.02 * xx - 0.05 * yy
    assert roughness.roughness_ra(tilted) < 1e-9
    short = 0.5 * np.sin(2 * np.pi * xx / 6.0)           # λ ≪ λc: kept
    wavy = 4.0 * np.sin(2 * np.pi * xx / 480.0)          # λ ≫ λc: removed
    ra_short = roughness.roughness_ra(short)              # (2A/π sampled at 6 points a period)
    assert roughness.roughness_ra(short + wavy, cutoff=40.0) == pytest.approx(ra_short, rel=0.05)
    assert roughness.roughness_ra(short + wavy) > 3 * ra_short           # without the filter it dominates
    with_holes = short + wavy
    with_holes[5:9, 100:140] = np.nan
    assert roughness.roughness_ra(with_holes, cutoff=40.0) == pytest.approx(ra_short, rel=0.05)
    with pytest.raises(InputError, match="usable points"):
        roughness.roughness_ra(np.full((4, 4), np.nan))


def test_volume_fractions_of_the_phantom(cell):
    fr = roughness.volume_fractions(cell["labels"])
    assert sum(fr.values()) == pytest.approx(1.0)
    for comp in ("anode", "spe", "cathode"):
        assert fr[comp] == pytest.approx(cell["fractions"][comp], abs=0.02), comp
    masked = roughness.volume_fractions(cell["labels"], mask=cell["mask"])
    assert masked["air"] == 0.0
    everything = roughness.volume_fractions(cell["labels"], mask=np.ones((64, 64), bool))
    assert everything["air"] == pytest.approx(1 - cell["mask"].mean(), abs=1e-9)


def test_segment_orders_classes_by_attenuation(cell):
    labels, th = roughness.segment(cell["volume"])
    assert labels.dtype == np.int8 and th.shape == (3,)
    agree = np.mean(_crop(labels) == _crop(cell["labels"]))
    assert agree > 0.97
    same, _ = roughness.segment(cell["volume"], thresholds=th)
    np.testing.assert_array_equal(same, labels)
    with pytest.raises(InputError, match="3 increasing"):
        roughness.segment(cell["volume"], thresholds=(0.02, 0.01, 0.03))


def test_flipped_cell_is_analysed_the_right_way_up(cell):
    res = roughness.analyse_volume(cell["volume"][::-1].copy(), roi=ROI, voxel_um=2.0)
    assert res["order"] == "anode-top"
    nz = cell["volume"].shape[0]
    for name in NAMES:
        truth = (nz - 1) - _crop(cell["height"][name])
        assert np.sqrt(np.mean((res["height"][name] - truth) ** 2)) < 0.1
        assert res["ra_um"][name] == pytest.approx(2.0 * roughness.roughness_ra(truth), rel=0.02)


def test_write_phantom_writes_the_scan_and_its_truth(tmp_path):
    scan_url, truth = phantom.write_phantom(str(tmp_path / "cell.nxs"), shape=(12, 32, 32), n_angles=16,
                                            anode=(0.0, 0.4), spe=(0.4, 0.7), amplitude=(1.0, 0.5))
    assert truth.endswith("cell.truth.h5")
    proj = ct.open_projections(scan_url)
    assert proj.shape == (16, 12, 32)
    with h5py.File(truth) as f:
        assert f["height/anode_spe"].shape == (32, 32)
        assert f.attrs["ra_anode_spe"] > 0
