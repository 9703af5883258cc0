"""Raw readers: contract-layout HDF5 files (local and S3) and CBF/EDF series through fabio.

``make_raw`` writes small raw datasets in the shared/DESIGN.md layout whose frames are
made by pyFAI (``calcfrom1d``) from known 1D patterns; the integration tests reuse it.
"""

from __future__ import annotations

import os

import fabio
import h5py
import hdf5plugin
import numpy as np
import pytest
from pyFAI.detectors import Detector
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from xrdscale.io import frames
from xrdscale.exceptions import InputError, StorageError

WAVELENGTH = 0.130509  # Å
SHAPE = (48, 40)


def make_ai(shape=SHAPE) -> AzimuthalIntegrator:
    det = Detector(pixel1=172e-6, pixel2=172e-6, max_shape=shape)
    return AzimuthalIntegrator(dist=0.1, poni1=-0.0015, poni2=0.0035, rot1=0.0, detector=det,
                               wavelength=WAVELENGTH * 1e-10)


def peak_pattern(tth: np.ndarray, centres, widths, heights) -> np.ndarray:
    out = np.full_like(tth, 5.0)
    for c, w, h in zip(centres, widths, heights):
        out += h * np.exp(-0.5 * ((tth - c) / w) ** 2)
    return out


def make_raw(path, angles, translations, *, shape=SHAPE, rng=None, monitor=None, poni_path=None):
    """Write a contract-layout raw file; frame i shows a 1D pattern whose peak heights vary with i.

    Returns the per-frame 1D patterns' parameters (heights) so callers can check them.
    """
    rng = rng or np.random.default_rng(0)
    ai = make_ai(shape)
    if poni_path is not None:
        ai.write(str(poni_path))
    n = len(angles)
    tth = np.linspace(0.0, 6.0, 2000)
    heights = rng.uniform(50, 400, size=(n, 3))
    monitor = np.asarray(monitor if monitor is not None else rng.uniform(0.9, 1.1, n), dtype=np.float64)
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset(frames.DATA, shape=(n, *shape), dtype=np.int32, chunks=(1, *shape),
                                 **hdf5plugin.Bitshuffle())
        for i in range(n):
            one_d = peak_pattern(tth, (1.4, 2.2, 3.1), (0.05, 0.08, 0.06), heights[i])
            img = ai.calcfrom1d(tth, one_d, shape=shape, dim1_unit="2th_deg", correctSolidAngle=True,
                                polarization_factor=0.99)
            data[i] = rng.poisson(np.clip(img, 0, None) * monitor[i]).astype(np.int32)
        h5[frames.MONITOR] = monitor
        h5[frames.ANGLE] = np.asarray(angles, dtype=np.float64)
        h5[frames.TRANSLATION] = np.asarray(translations, dtype=np.float64)
    return heights


def test_open_raw_reads_positioners_and_frames(tmp_path):
    angles, trans = np.repeat([0.0, 90.0], 3), np.tile([-1.0, 0.0, 1.0], 2)
    make_raw(tmp_path / "raw.nxs", angles, trans)
    scan = frames.open_raw(str(tmp_path / "raw.nxs"))
    assert scan.source.n_frames == 6 and scan.source.frame_shape == SHAPE
    np.testing.assert_array_equal(scan.angle, angles)
    np.testing.assert_array_equal(scan.translation, trans)
    with h5py.File(tmp_path / "raw.nxs") as h5:
        expect = h5[frames.DATA][2:5]
    got = dict(frames.read_frames(scan.source, 2, 5))
    assert sorted(got) == [2, 3, 4]
    for k, i in enumerate(range(2, 5)):
        np.testing.assert_array_equal(got[i], expect[k])


def test_missing_positioner_is_named(tmp_path):
    path = tmp_path / "raw.nxs"
    make_raw(path, [0.0, 1.0], [0.0, 0.0])
    with h5py.File(path, "a") as h5:
        del h5[frames.TRANSLATION]
    with pytest.raises(InputError, match=r"raw.nxs lacks /entry/sample/translation"):
        frames.open_raw(str(path))


def test_nan_positioner_names_frame(tmp_path):
    path = tmp_path / "raw.nxs"
    make_raw(path, [0.0, 1.0, 2.0], [0.0, 0.0, 0.0])
    with h5py.File(path, "a") as h5:
        h5[frames.ANGLE][1] = np.nan
    with pytest.raises(InputError, match=r"rotation_angle is not finite at frame 1"):
        frames.open_raw(str(path))


def test_not_hdf5_and_missing_file(tmp_path):
    bad = tmp_path / "raw.nxs"
    bad.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(InputError, match="not a readable HDF5"):
        frames.open_raw(str(bad))
    with pytest.raises(StorageError, match="does not exist"):
        frames.open_raw(str(tmp_path / "nope.nxs"))


@pytest.mark.parametrize("ext", ["edf", "cbf"])
def test_fabio_series_with_positioner_table(tmp_path, ext, rng):
    imgs = rng.integers(0, 1000, size=(4, *SHAPE)).astype(np.int32)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = fabio.edfimage.EdfImage if ext == "edf" else fabio.cbfimage.CbfImage
    for i, img in enumerate(imgs):
        writer(data=img).write(str(folder / f"f_{i:04d}.{ext}"))
    table = tmp_path / "pos.csv"
    # rows in a different order than the file names: the file column decides
    order = [2, 0, 3, 1]
    table.write_text("file,angle,translation,monitor\n"
                     + "".join(f"f_{i:04d}.{ext},{10.0 * i},{0.5 * i},{1.0 + i}\n" for i in order))
    scan = frames.open_raw(str(folder), positioners=str(table))
    assert scan.source.n_frames == 4
    np.testing.assert_array_equal(scan.angle, [10.0 * i for i in order])
    got = dict(frames.read_frames(scan.source, 0, 4))
    for k, i in enumerate(order):
        np.testing.assert_array_equal(got[k], imgs[i])
    with pytest.raises(InputError, match="positioner table"):
        frames.open_raw(str(folder))


def test_positioner_table_length_mismatch(tmp_path, rng):
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        fabio.edfimage.EdfImage(data=np.zeros(SHAPE, np.int32)).write(str(folder / f"f{i}.edf"))
    table = tmp_path / "pos.csv"
    table.write_text("angle,translation,monitor\n0,0,1\n1,0,1\n")
    with pytest.raises(InputError, match="has 2 rows but the series .* has 3 frames"):
        frames.open_raw(str(folder), positioners=str(table))


@pytest.mark.s3
def test_hdf5_over_s3(tmp_path, s3_bucket):
    import s3fs

    local = tmp_path / "raw.nxs"
    make_raw(local, [0.0, 45.0, 90.0], [0.0, 0.1, 0.2])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["XRDSCALE_S3_ENDPOINT_URL"]})
    fs.put_file(str(local), f"{s3_bucket}/raw/raw.nxs")
    scan = frames.open_raw(f"{s3_bucket}/raw/raw.nxs")
    np.testing.assert_array_equal(scan.translation, [0.0, 0.1, 0.2])
    with h5py.File(local) as h5:
        expect = h5[frames.DATA][()]
    for i, frame in frames.read_frames(scan.source, 0, 3):
        np.testing.assert_array_equal(frame, expect[i])
