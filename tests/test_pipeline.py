"""The stages chained on one simulated scan, checked against the phantom's truth.

Each stage has its own tests against its library; these check that the stages agree with
each other: geometry conventions, units and orientation from raw frames to volumes.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xrdscale.io import storage
from xrdscale.simulate.beamtime import make_detector
from xrdscale.physics.pattern import Instrument
from xrdscale.simulate.phantom import make_phantom
from xrdscale.simulate.scan import scan_phantom

WAVELENGTH = 0.130509


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    phantom = make_phantom(48, voltage=4.2, seed=3)
    detector = make_detector("demo")
    q = np.linspace(1.16, 3.82, 600)
    scan_phantom(phantom, str(out / "raw.nxs"), str(out / "truth.zarr"), detector,
                 Instrument(WAVELENGTH, W=4e-4), n_angles=32, subsets=4, axis_offset_steps=1.37,
                 truth_q=q, seed=3)
    return out, phantom


def _peak_image(volume: xr.Dataset, q0: float, half: float = 0.04) -> np.ndarray:
    q = volume.q.values
    sel = (q > q0 - half) & (q < q0 + half)
    return volume.intensity.values[:, :, sel].sum(-1)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_truth_projections_reconstruct_upright_in_absolute_units(scanned, tmp_path):
    """Radon conventions of simulator and reconstruction agree (no flip, no transpose)."""
    from xrdscale.stages.reconstruct import reconstruct

    out, phantom = scanned
    truth = storage.open_store(str(out / "truth.zarr"), stage="truth")
    tr = truth.translation.values
    step = float(np.diff(tr).mean())
    sym = (np.arange(tr.size) - (tr.size - 1) / 2) * step
    proj = truth.projection.values
    sino = np.empty_like(proj)
    for a in range(proj.shape[0]):
        for k in range(proj.shape[2]):
            sino[a, :, k] = np.interp(sym, tr, proj[a, :, k], left=0.0, right=0.0)
    ds = xr.Dataset({"intensity": (("angle", "translation", "q"), sino)},
                    coords={"angle": truth.angle.values, "translation": sym, "q": truth.q.values})
    storage.write_store(ds.chunk({"q": 100}), str(tmp_path / "sino.zarr"), stage="sinogram")
    reconstruct(str(tmp_path / "sino.zarr"), str(tmp_path / "vol.zarr"))
    vol = storage.open_store(str(tmp_path / "vol.zarr"), stage="volume")
    nca = phantom.scale.sel(phase="NCA").fillna(0).values
    img = _peak_image(vol, 1.30)
    assert _pearson(img, nca) > 0.9
    assert _pearson(img, nca) > _pearson(img[::-1], nca) + 0.3
    assert _pearson(img, nca) > _pearson(img.T, nca) + 0.3
