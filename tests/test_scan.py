"""Acquisition: positioners, ray sums, detector frames vs pyFAI, raw layout, truth store, S3."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest
import xarray as xr

from xrdscale.exceptions import ConfigError
from xrdscale.io import contracts, storage
from xrdscale.physics.crystal import builtin_phase
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.simulate.geometry import DetectorModel, ray_matrix
from xrdscale.simulate.phantom import make_phantom
from xrdscale.simulate.scan import plan_scan, scan_phantom

WL = 0.130509


def small_detector(n=48, mask_row=20):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = Detector(pixel1=172e-6, pixel2=172e-6, max_shape=(n, n))
    ai = AzimuthalIntegrator(dist=0.28 * n / 128, poni1=-3.2 * 172e-6, poni2=-2.7 * 172e-6, detector=det,
                             wavelength=WL * 1e-10)
    mask = np.zeros((n, n), dtype=bool)
    mask[mask_row] = True
    return DetectorModel.from_integrator(ai, mask, polarization_factor=0.95)


@pytest.mark.parametrize("n_angles, subsets, n_t", [(40, 4, 7), (12, 3, 5), (6, 1, 4)])
def test_zigzag_interlaced_positioners(n_angles, subsets, n_t):
    step = 0.03
    p = plan_scan(n_angles, n_t, step, subsets=subsets, axis_offset_steps=2.37)
    assert p.n_frames == n_angles * n_t
    # every (angle, translation) pair exactly once
    pairs = {(round(a, 9), round(t, 9)) for a, t in zip(p.angle, p.translation)}
    assert len(pairs) == n_angles * n_t
    # union of the subsets: evenly spaced over [0, 180)
    union = np.sort(p.line_angles)
    assert np.allclose(np.diff(union), 180.0 / n_angles) and union[0] == 0 and union[-1] < 180
    # each subset has the same step (180 / per subset) and subsets start staggered by one union step
    per = n_angles // subsets
    subs = p.line_angles.reshape(subsets, per)
    assert np.allclose(np.diff(subs, axis=1), 180.0 / per)
    assert np.allclose(np.diff(subs[:, 0]), 180.0 / n_angles)
    # zigzag: translation direction alternates line by line
    lines = p.translation.reshape(n_angles, n_t)
    for k, line in enumerate(lines):
        d = np.diff(line)
        assert np.all(d > 0) if k % 2 == 0 else np.all(d < 0)
        assert np.allclose(np.sort(line), (np.arange(n_t) - (n_t - 1) / 2) * step)
    assert p.axis_mm == pytest.approx(2.37 * step)


def test_bad_plan_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple"):
        plan_scan(10, 5, 0.1, subsets=4)


@pytest.mark.parametrize("angle", [0.0, 23.0, 45.0, 90.0, 137.5])
def test_ray_sums_of_a_disk_are_chords(angle):
    n, r, ss = 64, 20.0, 8
    c = np.arange(n) - (n - 1) / 2
    sub = ((np.arange(ss) + 0.5) / ss - 0.5)
    yy, xx = c[:, None, None, None] + sub[None, None, :, None], c[None, :, None, None] + sub[None, None, None, :]
    disk = ((yy**2 + xx**2) <= r**2).mean(axis=(2, 3))                     # area fractions
    t = np.linspace(-17.5, 17.5, 36)
    sums = ray_matrix(n, angle, t) @ disk.ravel()
    assert np.allclose(sums, 2 * np.sqrt(r**2 - t**2), rtol=0.02, atol=0.1)


def test_ray_sums_equal_astra_forward_projection():
    astra = pytest.importorskip("astra")
    n, nd = 32, 40
    img = np.random.default_rng(0).random((n, n)).astype(np.float32)
    angles = np.array([0.0, 17.3, 45.0, 91.0, 123.4, 179.5])
    vg = astra.create_vol_geom(n, n)
    pg = astra.create_proj_geom("parallel", 1.0, nd, np.deg2rad(angles))
    pid = astra.create_projector("linear", pg, vg)
    # ASTRA's rows run from +y downwards: our y-ascending image is its image flipped.
    sid, ref = astra.create_sino(np.ascontiguousarray(img[::-1]), pid)
    astra.data2d.delete(sid)
    astra.projector.delete(pid)
    t = np.arange(nd) - (nd - 1) / 2
    mine = np.stack([ray_matrix(n, a, t) @ img.ravel() for a in angles])
    assert np.allclose(mine, ref, rtol=1e-4, atol=1e-4)


def test_frame_integrates_back_to_its_pattern_with_pyfai():
    det = small_detector(128, mask_row=60)
    q = np.arange(0.1, det.q_range()[1] + 0.01, 0.001)
    phases = [builtin_phase("Cu"), builtin_phase("Al")]
    params = {"Cu": {"scale": np.array([1.0]), "size_nm": np.array([300.0])},
              "Al": {"scale": np.array([0.7]), "size_nm": np.array([300.0])}}
    pattern = simulate_patterns(q, phases, params, Instrument(WL, W=4e-4))[0]
    i0 = 5.0e3 / (pattern.max() * det.gain.max())
    frame = det.frames(q, pattern[None], np.array([i0]), np.random.default_rng(1))[0]
    assert frame.dtype == np.int32 and (frame[det.mask] == -1).all()
    res = det.integrator.integrate1d(frame, 800, unit="q_A^-1", radial_range=(1.5, 3.8), mask=det.mask,
                                     correctSolidAngle=True, polarization_factor=0.95, normalization_factor=i0,
                                     method=("full", "histogram", "cython"))
    ref = np.interp(res.radial, q, pattern)
    # Reflections inside the range, from the structures (independent of the detector model)
    peaks = np.sort(np.concatenate([
        ph.reflections(WL, 3.75, 1.55).q for ph in phases]))
    areas_ref, areas_int = [], []
    for qp in peaks:
        win = np.abs(res.radial - qp) < 0.04
        assert abs(res.radial[win][np.argmax(res.intensity[win])] - qp) < 0.012      # same position
        areas_ref.append(ref[win].sum())
        areas_int.append(res.intensity[win].sum())
    rel_ref = np.array(areas_ref) / max(areas_ref)
    rel_int = np.array(areas_int) / max(areas_int)
    assert np.allclose(rel_int, rel_ref, atol=0.06)                                    # same relative intensities
    assert res.intensity.sum() == pytest.approx(ref.sum(), rel=0.03)                  # absolute units survive


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    det = small_detector(40)
    ph = make_phantom(24, voltage=3.85, seed=2)
    truth_q = np.linspace(1.2, 3.6, 300)
    result = scan_phantom(ph, str(out / "raw.nxs"), str(out / "truth.zarr"), det, Instrument(WL), n_angles=8,
                          subsets=2, axis_offset_steps=1.37, truth_q=truth_q, seed=5)
    return out, ph, det, result


def test_raw_file_follows_the_nexus_layout(small_scan):
    out, ph, det, result = small_scan
    p = plan_scan(8, 24, ph.attrs["voxel_size_mm"], subsets=2, axis_offset_steps=1.37)
    with h5py.File(out / "raw.nxs", "r") as f:
        data = f["/entry/data/data"]
        assert data.shape == (8 * 24, 40, 40) and data.dtype == np.int32
        assert data.chunks == (1, 40, 40)
        plist = data.id.get_create_plist()
        assert hdf5plugin.BSHUF_ID in [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        assert f["/entry"].attrs["NX_class"] == "NXentry"
        assert f["/entry/data"].attrs["NX_class"] == "NXdata"
        assert f["/entry/instrument/monitor"].attrs["NX_class"] == "NXmonitor"
        assert np.allclose(f["/entry/sample/rotation_angle"][()], p.angle)
        assert np.allclose(f["/entry/sample/translation"][()], p.translation)
        mon = f["/entry/instrument/monitor/data"][()]
        assert np.all(mon > 0) and 0.005 < mon.std() / mon.mean() < 0.08                  # a few % fluctuation
        frames = data[()]
    assert (frames[:, det.mask] == -1).all() and frames[:, ~det.mask].min() >= 0
    assert frames[:, ~det.mask].sum() > 0
    problems = contracts.check_raw(str(out / "raw.nxs"))
    assert problems == [], problems


def test_truth_projection_is_the_ray_sum_of_voxel_patterns(small_scan):
    out, ph, det, result = small_scan
    truth = storage.open_store(str(out / "truth.zarr"), stage="truth")
    proj = truth["projection"]
    assert proj.dims == ("angle", "translation", "q")
    assert np.all(np.diff(truth.angle.values) > 0) and truth.angle.values.max() < 180
    vox = ph.attrs["voxel_size_mm"]
    steps = truth.attrs["center_offset_steps"]
    assert steps == pytest.approx(1.37) and abs(steps - round(steps)) > 0.1
    assert np.allclose(np.diff(truth.translation.values), vox)
    for v in ("scale", "a", "c", "size"):
        xr.testing.assert_allclose(truth[v].load(), ph[v])
    # independent: every voxel's pattern straight from its own parameters, summed along the rays
    q = truth.q.values
    n = ph.sizes["x"]
    vox_patterns = np.zeros((n * n, q.size))
    for i, name in enumerate(ph.phase.values.tolist()):
        s = ph.scale.values[i].ravel()
        idx = np.flatnonzero(s > 0)
        if idx.size == 0:
            continue
        phase = builtin_phase(name)
        p = {"scale": s[idx]}
        for key, var in (("a", "a"), ("c", "c"), ("size_nm", "size")):
            if key in phase.lattice_keys or (key == "size_nm" and phase.lattice_keys):
                p[key] = ph[var].values[i].ravel()[idx]
        vox_patterns[idx] += simulate_patterns(q, [phase], {name: p}, Instrument(WL))
    for k in (0, 3, 6):
        t_vox = truth.translation.values / vox
        expect = ray_matrix(n, float(truth.angle[k]), t_vox) @ vox_patterns
        got = proj.isel(angle=k).values
        assert np.allclose(got, expect, rtol=1e-3, atol=1e-3 * expect.max())


def test_raw_frame_integrates_to_the_truth_ray(small_scan):
    out, ph, det, result = small_scan
    truth = xr.open_zarr(out / "truth.zarr")
    with h5py.File(out / "raw.nxs", "r") as f:
        k = int(np.argmax(f["/entry/data/data"][()][:, ~det.mask].sum(axis=1)))   # the brightest frame
        frame = f["/entry/data/data"][k]
        mon = f["/entry/instrument/monitor/data"][k]
        angle, t = f["/entry/sample/rotation_angle"][k], f["/entry/sample/translation"][k]
    ref = truth.projection.sel(angle=angle).sel(translation=t - truth.attrs["center_offset_mm"],
                                                method="nearest", tolerance=1e-6)
    res = det.integrator.integrate1d(frame, truth.q.size, unit="q_A^-1", radial_range=(1.2, 3.6), mask=det.mask,
                                     correctSolidAngle=True, polarization_factor=det.polarization_factor,
                                     normalization_factor=mon)
    assert res.intensity.sum() == pytest.approx(float(ref.sum()), rel=0.1)


def test_scan_rejects_a_wavelength_mismatch(tmp_path):
    det = small_detector(16, mask_row=3)
    with pytest.raises(ConfigError, match="wavelength"):
        scan_phantom(make_phantom(16), str(tmp_path / "r.nxs"), str(tmp_path / "t.zarr"), det, Instrument(0.2),
                     n_angles=4, truth_q=np.linspace(1.2, 3, 10))


@pytest.mark.s3
def test_scan_streams_to_s3(s3_bucket, tmp_path):
    import s3fs

    det = small_detector(24, mask_row=5)
    raw, truth = f"{s3_bucket}/bt/raw/x.nxs", f"{s3_bucket}/bt/truth/x.zarr"
    scan_phantom(make_phantom(16, seed=1), raw, truth, det, Instrument(WL), n_angles=4, subsets=2,
                 truth_q=np.linspace(1.2, 3.6, 50), seed=1)
    endpoint = storage.storage_options(raw)["client_kwargs"]["endpoint_url"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.get(raw.replace("s3://", ""), str(tmp_path / "x.nxs"))
    with h5py.File(tmp_path / "x.nxs", "r") as f:
        assert f["/entry/data/data"].shape == (64, 24, 24)
        assert f["/entry/sample/rotation_angle"].shape == (64,)
    assert storage.is_complete(truth)
    assert storage.open_store(truth, stage="truth")["projection"].shape == (4, 16, 50)
