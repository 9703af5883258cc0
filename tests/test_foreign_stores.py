"""Stores xrdscale did not write: accepted when they meet the contract, through the next stage."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest
import xarray as xr

from _builders import DISK_STEP as STEP
from _builders import phantom_sinograms, scan_patterns
from xrdscale.exceptions import IncompleteStoreError, InputError
from xrdscale.io import contracts, storage
from xrdscale.stages.reconstruct import reconstruct
from xrdscale.stages.sinogram import build_sinogram

ZARR_WRITES = {  # how a user may write a store with plain xarray
    "v3-consolidated": {},
    "v3-plain": {"consolidated": False},
    "v2-plain": {"zarr_format": 2, "consolidated": False},
}


def plain_copy(src: str, url: str, **to_zarr) -> str:
    """Write the data of an xrdscale store again with plain xarray: no provenance attrs, no marker."""
    ds = storage.open_store(src).load()
    ds.attrs = {}
    for v in ds.variables.values():
        v.encoding = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        ds.to_zarr(url, **to_zarr)
    assert not storage.is_complete(url) and "xrdscale_version" not in storage.store_layout(url).attrs
    return url


def accepted(caplog, url: str, kind: str) -> bool:
    want = f"{url}: not written by xrdscale; accepted as a {kind} store (it meets the contract)"
    return any(r.getMessage() == want and r.levelno == logging.INFO for r in caplog.records)


@pytest.mark.parametrize("how", list(ZARR_WRITES))
def test_plain_patterns_store_through_the_sinogram_stage(tmp_path, caplog, how):
    ours = scan_patterns(tmp_path / "ours.zarr", center=4.0, angles=np.arange(0.0, 180.0, 12.0), n_trans=41)
    theirs = plain_copy(ours, str(tmp_path / "theirs.zarr"), **ZARR_WRITES[how])
    with caplog.at_level(logging.INFO, logger="xrdscale"):
        out = build_sinogram(theirs, str(tmp_path / "s.zarr"), center=2.0, progress=False)
    assert accepted(caplog, theirs, "patterns")
    ref = build_sinogram(ours, str(tmp_path / "ref.zarr"), center=2.0, progress=False)
    got, want = storage.open_store(out, stage="sinogram"), storage.open_store(ref, stage="sinogram")
    np.testing.assert_array_equal(got["intensity"].values, want["intensity"].values)
    assert np.isclose(got["translation"].values[1] - got["translation"].values[0], STEP)
    assert contracts.check(out) == ("sinogram", [])


@pytest.mark.parametrize("how", ["v3-consolidated", "v2-plain"])
def test_plain_sinogram_store_through_reconstruction(tmp_path, caplog, how):
    sino, _, angles = phantom_sinograms(n=31, a=36, scales=(1.0, 2.0))  # odd steps centred on 0
    n = sino.shape[1]
    ds = xr.Dataset({"intensity": (("angle", "translation", "q"), sino.astype(np.float32))},
                    coords={"angle": angles, "translation": (np.arange(n) - (n - 1) / 2) * 0.03,
                            "q": np.linspace(1.2, 3.8, sino.shape[2])})
    theirs = str(tmp_path / "theirs.zarr")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        ds.to_zarr(theirs, **ZARR_WRITES[how])
    ours = storage.write_store(ds, str(tmp_path / "ours.zarr"), stage="sinogram")
    with caplog.at_level(logging.INFO, logger="xrdscale"):
        out = reconstruct(theirs, str(tmp_path / "v.zarr"), progress=False)
    assert accepted(caplog, theirs, "sinogram")
    ref = reconstruct(ours, str(tmp_path / "ref.zarr"), progress=False)
    got = storage.open_store(out, stage="volume")["intensity"].values
    np.testing.assert_allclose(got, storage.open_store(ref, stage="volume")["intensity"].values, rtol=1e-6, atol=1e-6)
    assert contracts.check(out) == ("volume", [])


def test_plain_volume_store_opened_by_the_analyse_path(tmp_path, caplog):
    c = np.arange(5) * 0.03
    ds = xr.Dataset({"intensity": (("y", "x", "q"), np.ones((5, 5, 16), np.float32))},
                    coords={"y": c, "x": c, "q": np.linspace(1.2, 2.8, 16)})
    url = str(tmp_path / "vol.zarr")
    ds.to_zarr(url, consolidated=False)
    with caplog.at_level(logging.INFO, logger="xrdscale"):
        got = storage.open_store(url)  # how predict and the analyse stage open their input
    assert accepted(caplog, url, "volume")
    assert got["intensity"].dims == ("y", "x", "q")
    assert storage.open_store(url, stage="volume")["intensity"].shape == (5, 5, 16)  # as denoise opens it


def test_foreign_store_not_meeting_the_contract_is_refused(tmp_path):
    c = np.arange(4) * 0.03
    url = str(tmp_path / "vol.zarr")
    xr.Dataset({"intensity": (("x", "y", "q"), np.ones((4, 4, 3), np.float32))},
               coords={"x": c, "y": c, "q": [3.0, 2.0, 1.0]}).to_zarr(url, consolidated=False)
    with pytest.raises(InputError) as err:
        storage.open_store(url, stage="volume")
    assert str(err.value) == (
        f"{url} was not written by xrdscale and does not meet the 'volume' store contract (2 problem(s)):\n"
        f"  {url}: variable intensity has dims (x, y, q); expected (y, x, q)\n"
        f"  {url}: coordinate q is not strictly increasing (3 … 1); expected ascending values")
    sino = str(tmp_path / "sino.zarr")
    xr.Dataset({"intensity": (("angle", "translation", "q"), np.ones((3, 5, 2), np.float32))},
               coords={"angle": [0.0, 60.0, 120.0], "translation": np.arange(5) * 0.1 + 1.0,
                       "q": [1.0, 2.0]}).to_zarr(sino, consolidated=False)
    with pytest.raises(InputError, match="translation spans 1 … 1.4 mm; expected the rotation axis at "
                                         "translation 0 inside the range"):
        reconstruct(sino, str(tmp_path / "v.zarr"), progress=False)
    with pytest.raises(InputError, match="does not meet the 'sinogram' store contract; its variables match "
                                         "a 'volume' store"):
        storage.open_store(_plain_volume(tmp_path), stage="sinogram")
    lib = _plain_volume(tmp_path, "lib.zarr")
    with pytest.raises(InputError, match="'pqnet-library' store has no data contract"):
        storage.open_store(lib, stage="pqnet-library")


def _plain_volume(tmp_path, name="ok-vol.zarr") -> str:
    c = np.arange(3) * 0.03
    url = str(tmp_path / name)
    xr.Dataset({"intensity": (("y", "x", "q"), np.ones((3, 3, 2), np.float32))},
               coords={"y": c, "x": c, "q": [1.0, 2.0]}).to_zarr(url, consolidated=False)
    return url


def test_half_written_xrdscale_stores_are_still_refused(tmp_path):
    import dask.array as da

    ds = xr.Dataset({"intensity": (("frame", "q"), da.ones((6, 4), chunks=(3, 4), dtype=np.float32))},
                    coords={"q": np.arange(4.0) + 1, "angle": ("frame", np.arange(6.0)),
                            "translation": ("frame", np.zeros(6))})
    url = str(tmp_path / "partial.zarr")
    storage.create_store(ds, url, stage="patterns", compute=False)  # metadata, no chunks, no marker
    with pytest.raises(IncompleteStoreError, match="is incomplete"):
        storage.open_store(url, stage="patterns")
    with pytest.raises(IncompleteStoreError):
        build_sinogram(url, str(tmp_path / "s.zarr"), center=0.0, progress=False)
    done = storage.write_store(ds, str(tmp_path / "done.zarr"), stage="patterns")
    storage.clear(os.path.join(done, storage.MARKER))  # complete data, marker lost: xrdscale's, refused
    with pytest.raises(IncompleteStoreError):
        storage.open_store(done)
    empty = str(tmp_path / "empty.zarr")
    os.makedirs(empty)
    with pytest.raises(IncompleteStoreError):
        storage.open_store(empty)
    xr.Dataset().to_zarr(str(tmp_path / "group.zarr"))  # a group with no arrays: to_zarr interrupted early
    with pytest.raises(IncompleteStoreError):
        storage.open_store(str(tmp_path / "group.zarr"))
    assert contracts.check(url)[1][0].startswith(f"{url}: incomplete: xrdscale started this store")


def test_foreign_store_on_s3(s3_server, tmp_path, caplog):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("foreign")
    url = "s3://foreign/vol.zarr"
    c = np.arange(3) * 0.03
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        xr.Dataset({"intensity": (("y", "x", "q"), np.ones((3, 3, 2), np.float32))},
                   coords={"y": c, "x": c, "q": [1.0, 2.0]}).to_zarr(url, storage_options=storage.storage_options(url))
    with caplog.at_level(logging.INFO, logger="xrdscale"):
        ds = storage.open_store(url, stage="volume")
    assert accepted(caplog, url, "volume") and ds["intensity"].shape == (3, 3, 2)
    assert contracts.check(url) == ("volume", [])
