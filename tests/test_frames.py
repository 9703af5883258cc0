"""Raw readers: contract-layout HDF5 files (local and S3) and CBF/EDF series through fabio.

``make_raw`` (tests/_builders.py) writes small raw datasets in the shared/DESIGN.md layout
whose frames are made by pyFAI (``calcfrom1d``) from known 1D patterns.
"""

from __future__ import annotations

import os

import fabio
import h5py
import numpy as np
import pytest

from _builders import FRAME_SHAPE as SHAPE
from _builders import make_raw
from xrdscale.io import frames
from xrdscale.exceptions import InputError, StorageError


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
