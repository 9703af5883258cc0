"""Integration stage: equality with a plain per-frame pyFAI loop, bad input, S3, huge graphs."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pyFAI
import pytest

from _builders import FRAME_SHAPE as SHAPE
from _builders import make_raw
from xrdscale.io import frames, storage
from xrdscale.exceptions import InputError, StorageError, XrdscaleWarning
from xrdscale.stages.integrate import integrate, patterns_dataset, resolve_spec

NPT = 64
Q_RANGE = (1.0, 3.0)


@pytest.fixture
def raw(tmp_path):
    angles = np.repeat([0.0, 60.0, 120.0], 4)
    trans = np.tile([-0.3, -0.1, 0.1, 0.3], 3)
    make_raw(tmp_path / "raw.nxs", angles, trans, poni_path=tmp_path / "det.poni")
    return tmp_path


def plain_loop(raw_path, poni, method, *, mask=None, polarization_factor=0.99, q_range=Q_RANGE):
    """The reference: one pyFAI integrator, frame after frame, divided by I0 through pyFAI."""
    ai = pyFAI.load(str(poni))
    out = []
    with h5py.File(raw_path) as h5:
        data, monitor = h5[frames.DATA], h5[frames.MONITOR][()]
        for i in range(data.shape[0]):
            kw = dict(unit="q_A^-1", radial_range=q_range, mask=mask, polarization_factor=polarization_factor,
                      correctSolidAngle=True, normalization_factor=float(monitor[i]))
            if method == "trimmed_mean":
                res = ai.medfilt1d_ng(data[i], NPT, percentile=(10, 90), **kw)
            elif method == "sigma_clip":
                res = ai.sigma_clip_ng(data[i], NPT, error_model="azimuthal", thres=5.0, **kw)
            else:
                res = ai.integrate1d(data[i], NPT, **kw)
            out.append(res.intensity)
    return res.radial, np.array(out)


@pytest.mark.parametrize("method", ["trimmed_mean", "mean", "sigma_clip"])
def test_patterns_equal_plain_pyfai_loop(raw, method):
    out = str(raw / "patterns.zarr")
    mask = np.zeros(SHAPE, dtype=np.int8)
    mask[10:14, 5:30] = 1
    np.save(raw / "mask.npy", mask)
    integrate(str(raw / "raw.nxs"), out, poni=str(raw / "det.poni"), mask=str(raw / "mask.npy"), npt=NPT,
              q_range=Q_RANGE, method=method, frames_per_chunk=5, progress=False)
    ds = storage.open_store(out, stage="patterns")
    q_ref, ref = plain_loop(raw / "raw.nxs", raw / "det.poni", method, mask=mask.astype(bool))
    np.testing.assert_allclose(ds["q"].values, q_ref, rtol=1e-6)
    got = ds["intensity"].values
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())
    with h5py.File(raw / "raw.nxs") as h5:
        np.testing.assert_array_equal(ds["angle"].values, h5[frames.ANGLE][()])
        np.testing.assert_array_equal(ds["translation"].values, h5[frames.TRANSLATION][()])
    assert ds.attrs["method"] == method and "Distance" in ds.attrs["poni"]
    assert "pyFAI" in ds.attrs["versions"] and ds.attrs["stage"] == "patterns"


def test_trimmed_mean_recovers_known_pattern(raw):
    """Independent check: the integrated frames reproduce the 1D patterns they were made from."""
    from _builders import make_ai, peak_pattern

    angles, trans = [0.0, 10.0], [0.0, 0.0]
    heights = make_raw(raw / "one.nxs", angles, trans, monitor=[1000.0, 2000.0])
    out = str(raw / "p.zarr")
    integrate(str(raw / "one.nxs"), out, poni=str(raw / "det.poni"), npt=NPT, q_range=Q_RANGE,
              method="trimmed_mean", progress=False)
    ds = storage.open_store(out)
    q = ds["q"].values
    tth = np.degrees(2 * np.arcsin(q * 0.130509 / (4 * np.pi)))
    assert make_ai().detector.shape == SHAPE
    for i in range(2):
        truth = peak_pattern(tth, (1.4, 2.2, 3.1), (0.05, 0.08, 0.06), heights[i])
        got = ds["intensity"].values[i]
        # Poisson noise at ~1000x counts; the trimmed mean is slightly biased on steep peak flanks
        assert np.median(np.abs(got - truth) / truth) < 0.03


def test_frame_shape_must_match_poni(raw, tmp_path):
    make_raw(tmp_path / "small.nxs", [0.0], [0.0], shape=(40, 40))
    out = str(tmp_path / "p.zarr")
    with pytest.raises(InputError, match=r"small.nxs: frames are \(40, 40\) pixels but the PONI"):
        integrate(str(tmp_path / "small.nxs"), out, poni=str(raw / "det.poni"), npt=NPT, progress=False)
    assert not storage.exists(out)


def test_corrupt_chunk_names_dataset_and_frame(raw):
    path = raw / "raw.nxs"
    with h5py.File(path, "r") as h5:
        offset, size = h5[frames.DATA].id.get_chunk_info(7).byte_offset, h5[frames.DATA].id.get_chunk_info(7).size
    with open(path, "r+b") as f:
        f.seek(offset + 16)
        f.write(os.urandom(size - 32))
    out = str(raw / "p.zarr")
    with pytest.raises(InputError, match=r"raw.nxs: frame 7 of /entry/data/data cannot be read"):
        integrate(str(path), out, poni=str(raw / "det.poni"), npt=NPT, q_range=Q_RANGE, frames_per_chunk=4,
                  progress=False)
    assert not storage.exists(out)  # the partial store was removed


def test_truncated_file(raw):
    path = raw / "raw.nxs"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(InputError, match="raw.nxs"):
        integrate(str(path), str(raw / "p.zarr"), poni=str(raw / "det.poni"), npt=NPT, progress=False)
    assert not storage.exists(str(raw / "p.zarr")) or not storage.is_complete(str(raw / "p.zarr"))


def test_negative_counts_and_all_masked(raw):
    path = raw / "raw.nxs"
    with h5py.File(path, "a") as h5:
        frame = h5[frames.DATA][5]
        frame[20, 20] = -3
        h5[frames.DATA][5] = frame
    out = str(raw / "p.zarr")
    with pytest.raises(InputError, match=r"raw.nxs: frame 5 has 1 unmasked pixel\(s\) with negative"):
        integrate(str(path), out, poni=str(raw / "det.poni"), npt=NPT, q_range=Q_RANGE, progress=False)
    assert not storage.exists(out) or not storage.is_complete(out)
    # the same pixel masked: accepted
    mask = np.zeros(SHAPE, np.uint8)
    mask[20, 20] = 1
    np.save(raw / "m.npy", mask)
    integrate(str(path), out, poni=str(raw / "det.poni"), mask=str(raw / "m.npy"), npt=NPT, q_range=Q_RANGE,
              progress=False)
    assert storage.is_complete(out)
    np.save(raw / "all.npy", np.ones(SHAPE, np.uint8))
    with pytest.raises(InputError, match="leaves no valid pixel"):
        integrate(str(path), out, poni=str(raw / "det.poni"), mask=str(raw / "all.npy"), npt=NPT, progress=False)
    assert not storage.is_complete(out)
    with pytest.raises(InputError, match="outside the detector's coverage"):
        integrate(str(path), out, poni=str(raw / "det.poni"), npt=NPT, q_range=(20.0, 30.0), progress=False)


def test_nan_counts_in_float_frames(raw, tmp_path):
    src = raw / "raw.nxs"
    dst = tmp_path / "float.nxs"
    with h5py.File(src) as a, h5py.File(dst, "w") as b:
        for k in (frames.MONITOR, frames.ANGLE, frames.TRANSLATION):
            b[k] = a[k][()]
        data = a[frames.DATA][()].astype(np.float32)
        data[3, 1, 1] = np.nan
        b[frames.DATA] = data
    with pytest.raises(InputError, match=r"float.nxs: frame 3 has 1 unmasked pixel\(s\) with negative or NaN"):
        integrate(str(dst), str(tmp_path / "p.zarr"), poni=str(raw / "det.poni"), npt=NPT, q_range=Q_RANGE,
                  progress=False)


def test_million_frame_graph_builds_without_reading(tmp_path):
    """A 1,000,000-frame Pilatus 2M dataset (never written: HDF5 allocates chunks lazily)."""
    from pyFAI.detectors import detector_factory

    det = detector_factory("Pilatus2MCdTe")
    ai = pyFAI.integrator.azimuthal.AzimuthalIntegrator(dist=1.0, poni1=0.14, poni2=0.12, detector=det,
                                                        wavelength=0.130509e-10)
    ai.write(str(tmp_path / "p2m.poni"))
    n = 1_000_000
    with h5py.File(tmp_path / "big.nxs", "w") as h5:
        h5.create_dataset(frames.DATA, shape=(n, *det.shape), dtype=np.int32, chunks=(1, *det.shape),
                          compression="gzip")
        ramp = np.arange(n, dtype=np.float64)
        h5.create_dataset(frames.MONITOR, data=np.ones(n), compression="gzip")
        h5.create_dataset(frames.ANGLE, data=(ramp // 1000) * 0.18, compression="gzip")
        h5.create_dataset(frames.TRANSLATION, data=(ramp % 1000) * 0.03, compression="gzip")
    assert (tmp_path / "big.nxs").stat().st_size < 50e6
    scan = frames.open_raw(str(tmp_path / "big.nxs"))
    spec = resolve_spec(scan, poni=str(tmp_path / "p2m.poni"), npt=1000, q_range=(0.5, 3.85))
    ds = patterns_dataset(scan, spec, frames_per_chunk=64)
    arr = ds["intensity"].data
    assert arr.shape == (n, 1000) and arr.numblocks == (-(-n // 64), 1)
    assert len(arr.__dask_graph__()) < 4 * arr.numblocks[0]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "xrdscale.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_integrate_and_error_exit(raw):
    out = raw / "cli.zarr"
    res = _cli("integrate", str(raw / "raw.nxs"), str(out), "--poni", str(raw / "det.poni"), "--npt", str(NPT),
               "--q-range", "1.0", "3.0", "--method", "mean", "--workers", "1")
    assert res.returncode == 0, res.stderr
    assert storage.is_complete(str(out))
    _, ref = plain_loop(raw / "raw.nxs", raw / "det.poni", "mean")
    np.testing.assert_allclose(storage.open_store(str(out))["intensity"].values, ref, rtol=2e-6,
                               atol=1e-6 * np.abs(ref).max())
    res = _cli("integrate", str(raw / "raw.nxs"), str(out), "--poni", str(raw / "det.poni"), "--method", "median")
    assert res.returncode != 0 and "unknown integration method 'median'" in res.stderr
    # settings are checked before anything runs: the earlier, complete result is left as it was
    assert storage.is_complete(str(out))
    res = _cli("integrate", "--help")
    assert res.returncode == 0 and "--percentile" in res.stdout


@pytest.mark.s3
def test_integrate_s3_to_s3_with_workers(raw, s3_bucket):
    from distributed import Client, LocalCluster

    fs, _ = storage.filesystem(s3_bucket)
    fs.put_file(str(raw / "raw.nxs"), f"{s3_bucket}/raw/raw.nxs")
    fs.put_file(str(raw / "det.poni"), f"{s3_bucket}/calib/det.poni")
    out = f"{s3_bucket}/work/patterns.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        integrate(f"{s3_bucket}/raw/raw.nxs", out, poni=f"{s3_bucket}/calib/det.poni", npt=NPT, q_range=Q_RANGE,
                  method="trimmed_mean", frames_per_chunk=3, client=client, progress=False)
    assert storage.is_complete(out)
    ds = storage.open_store(out, stage="patterns")
    _, ref = plain_loop(raw / "raw.nxs", raw / "det.poni", "trimmed_mean")
    np.testing.assert_allclose(ds["intensity"].values, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())
    text = " ".join(str(v) for v in ds.attrs.values())
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


@pytest.mark.s3
def test_unreachable_s3_and_missing_object(raw, s3_bucket):
    out = str(raw / "p.zarr")
    with pytest.raises(StorageError, match="does not exist"):
        integrate(f"{s3_bucket}/raw/nothing.nxs", out, poni=str(raw / "det.poni"), npt=NPT, progress=False)
    res = _cli("integrate", "s3://bucket/raw.nxs", out, "--poni", str(raw / "det.poni"),
               env={"XRDSCALE_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"})
    assert res.returncode == 1 and "error:" in res.stderr and "s3://bucket/raw.nxs" in res.stderr
    assert not storage.exists(out)


@pytest.mark.s3
def test_wrong_credentials(raw, tmp_path, monkeypatch):
    """A moto server that checks signatures (INITIAL_NO_AUTH_ACTION_COUNT=0) refuses unknown keys."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        wrong = {"XRDSCALE_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "wrong-key",
                 "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
        res = _cli("integrate", "s3://beamtime/raw.nxs", str(tmp_path / "p.zarr"), "--poni", str(raw / "det.poni"),
                   env=wrong)
        for key, value in wrong.items():  # the same refusal in process: a StorageError, not botocore's
            monkeypatch.setenv(key, value)
        with pytest.raises(StorageError, match=r"s3://beamtime/raw\.nxs.*credentials") as refused:
            frames.open_raw("s3://beamtime/raw.nxs")
    finally:
        proc.terminate()
        proc.wait(10)
    assert res.returncode == 1 and "s3://beamtime/raw.nxs" in res.stderr
    assert "credentials" in res.stderr and "wrong-secret-value" not in res.stderr
    assert "wrong-secret-value" not in str(refused.value)


def test_q_range_beyond_the_detector_warns_and_its_bins_hold_zero(raw):
    """The make_ai detector covers q 0.76 … 4.92 1/Å: from 0.2, the first bins get no pixel."""
    out = str(raw / "p.zarr")
    with pytest.warns(XrdscaleWarning, match=r"raw.nxs: q range \[0.2, 3\] 1/Å extends beyond the detector's "
                                             r"coverage \[0.76\d*, 4.9\d*\] 1/Å .* narrow q_range"):
        integrate(str(raw / "raw.nxs"), out, poni=str(raw / "det.poni"), npt=NPT, q_range=(0.2, 3.0),
                  progress=False)
    ds = storage.open_store(out, stage="patterns")
    q, inten = ds["q"].values, ds["intensity"].values
    assert np.all(inten[:, q < 0.7] == 0) and np.all(inten[:, q > 0.9] > 0)
