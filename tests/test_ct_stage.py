"""``xrdscale ct simulate|reconstruct|roughness`` end to end: the stores, the phantom's truth, bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from xrdscale.io import contracts, storage
from xrdscale.xcs import roughness as rough

ROI = (14, 50, 14, 50)  # inside the cylinder of the 64² phantom


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from xrdscale.xcs.phantom import write_phantom

    d = tmp_path_factory.mktemp("ct")
    url, truth = write_phantom(str(d / "scan.h5"), shape=(40, 64, 64), n_angles=180, rings=0.02, seed=4)
    with h5py.File(truth, "r") as f:
        heights = {k.replace("_", "/"): f[f"height/{k}"][()] for k in f["height"]}
        labels = f["labels"][()]
    return url, heights, labels


def test_reconstruct_and_roughness_match_the_phantom(scan, tmp_path, xrdscale_cli):
    url, heights, labels = scan
    vol = str(tmp_path / "vol.zarr")
    code, _, err = xrdscale_cli("ct", "reconstruct", url, vol)
    assert code == 0, err
    assert contracts.check(vol) == ("ct-volume", [])
    ds = storage.open_store(vol, stage="ct-volume")
    assert ds["attenuation"].shape == (40, 64, 64) and ds.attrs["rings"] == "all"
    out = str(tmp_path / "rough.zarr")
    code, _, err = xrdscale_cli("ct", "roughness", vol, out, "--roi", *map(str, ROI),
                                "--beam-planes", "{R1: [14, 26], R2: [8, 20], R3: [0, 12]}")
    assert code == 0, err
    assert contracts.check(out) == ("ct-roughness", [])
    r = storage.open_store(out, stage="ct-roughness")
    y0, y1, x0, x1 = ROI
    for name in ("anode/spe", "cathode/spe"):
        truth = heights[name][y0:y1, x0:x1]
        got = r["height"].sel(interface=name).values  # µm = voxels here (no pixel size in the file)
        rms = float(np.sqrt(np.nanmean((got - truth) ** 2)))
        assert rms < 1.0, (name, rms)
        ra_truth = rough.roughness_ra(truth)
        assert float(r["ra"].sel(interface=name)) == pytest.approx(ra_truth, rel=0.10)
    # volume fractions and α, β against the phantom's labels
    inside = labels[:, y0:y1, x0:x1]
    for i, comp in enumerate(("anode", "spe", "cathode"), start=1):
        frac = float((inside == i).sum() / (inside > 0).sum())
        assert float(r["fraction"].sel(component=comp)) == pytest.approx(frac, abs=0.02)
    anode = [(inside[a:b] == 1).sum() for a, b in ((14, 26), (8, 20), (0, 12))]
    assert r.attrs["alpha"] == pytest.approx(anode[1] / anode[2], abs=0.03)
    assert r.attrs["beta"] == pytest.approx(anode[0] / anode[2], abs=0.03)
    table = storage.read_bytes(storage.join(out, "roughness.csv")).decode()
    assert "R_a anode/spe" in table


def test_a_dask_cluster_gives_the_same_volume(scan, tmp_path, dask_client):
    from xrdscale.stages.ct import reconstruct

    url, _, _ = scan
    a = reconstruct(url, str(tmp_path / "a.zarr"), rows=(10, 22), center=32.0, chunk_rows=4, progress=False)
    b = reconstruct(url, str(tmp_path / "b.zarr"), rows=(10, 22), center=32.0, chunk_rows=6, client=dask_client,
                    progress=False)
    va = storage.open_store(a, stage="ct-volume")["attenuation"].values
    vb = storage.open_store(b, stage="ct-volume")["attenuation"].values
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-7)
    assert va.shape == (12, 64, 64)


def test_projections_without_flats_are_refused(tmp_path, xrdscale_cli):
    path = tmp_path / "noflats.h5"
    with h5py.File(path, "w") as h5:
        h5["projections"] = np.ones((8, 4, 16), np.float32)
        h5["angles"] = np.linspace(0, 360, 8, endpoint=False)
    out = str(tmp_path / "vol.zarr")
    code, _, err = xrdscale_cli("ct", "reconstruct", str(path), out)
    assert code != 0 and "flat" in err
    assert not storage.exists(out) or not storage.is_complete(out)


def test_roughness_refuses_a_store_that_is_not_a_volume(tmp_path, xrdscale_cli):
    code, _, err = xrdscale_cli("ct", "roughness", str(tmp_path / "missing.zarr"), str(tmp_path / "r.zarr"))
    assert code != 0 and "missing.zarr" in err
