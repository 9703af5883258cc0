"""The real campaign stage table, integrate to report, on a tiny simulated beamtime.

Every pipeline section is set to a value other than its default, and the test checks
that each value reached its stage, in what the stage recorded in its output store.
This is what keeps the spec, the stage functions and the campaign adapters from drifting.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from xrdscale.campaign.runner import run_campaign
from xrdscale.campaign.spec import load_spec
from xrdscale.io import storage
from xrdscale.physics.pattern import Instrument
from xrdscale.simulate.beamtime import make_detector, write_geometry
from xrdscale.simulate.phantom import make_phantom
from xrdscale.simulate.scan import scan_phantom

WAVELENGTH = 0.130509
Q = (1.2, 3.8, 260)  # the same range in the integration and the phase library: bin edges both


def _config(url: str) -> dict:
    return json.loads(storage.open_store(url).attrs["config"])


@pytest.fixture(scope="module")
def beamtime(tmp_path_factory):
    out = tmp_path_factory.mktemp("bt")
    det = make_detector("demo")
    write_geometry(det, str(out / "det.poni"), str(out / "mask.edf"))
    ph = make_phantom(24, voltage=4.2, seed=5)
    scan_phantom(ph, str(out / "raw.nxs"), str(out / "truth.zarr"), det, Instrument(WAVELENGTH, W=4e-4),
                 n_angles=16, subsets=2, truth_q=np.linspace(Q[0], Q[1], Q[2]), seed=5)
    lib = {"version": 1, "wavelength": WAVELENGTH, "q_grid": {"min": Q[0], "max": Q[1], "npt": Q[2]},
           "instrument": {"W": 4e-4}, "background": {"chebyshev_order": 2, "amplitude": [0.0, 0.05]},
           "noise": {"counts": [1.0e5, 1.0e6]},
           "phases": {"NCA": {"builtin": "NCA", "scale": [0, 1]}, "Al": {"builtin": "Al", "scale": [0, 1]},
                      "Cu": {"builtin": "Cu", "scale": [0, 1]}}}
    (out / "phases.yaml").write_text(yaml.safe_dump(lib))
    return out


def test_every_pipeline_setting_reaches_its_stage(beamtime, tmp_path):
    from xrdscale.stages.integrate import integrate
    from xrdscale.stages.reconstruct import open_sinogram
    from xrdscale.stages.sinogram import build_sinogram

    # the reconstruction grid, for a μ map of the right shape
    pat = integrate(str(beamtime / "raw.nxs"), str(tmp_path / "p.zarr"), poni=str(beamtime / "det.poni"),
                    mask=str(beamtime / "mask.edf"),
                    npt=Q[2], q_range=Q[:2], method="mean", progress=False)
    _, geometry = open_sinogram(build_sinogram(pat, str(tmp_path / "s.zarr"), air_columns=1, progress=False))
    np.save(tmp_path / "mu.npy", np.full((geometry.n_det, geometry.n_det), 0.02))

    spec = {
        "version": 1, "campaign": "e2e", "workspace": str(tmp_path / "work"),
        "geometry": {"poni": str(beamtime / "det.poni"), "mask": str(beamtime / "mask.edf")},
        "phases": str(beamtime / "phases.yaml"),
        "cluster": {"kind": "local", "workers": 1, "threads_per_worker": 2, "dashboard": False},
        "runner": {"concurrency": 1, "retries": 0},
        "pipeline": {
            "integrate": {"npt": Q[2], "q_range": list(Q[:2]), "method": "sigma_clip", "sigma_clip_threshold": 4.0,
                          "polarization_factor": 0.95, "frames_per_chunk": 7},
            "sinogram": {"air_columns": 1, "angle_tolerance": 0.05},
            "absorption": {"enabled": True, "mu_map": str(tmp_path / "mu.npy"), "min_transmission": 0.01,
                           "energy_kev": 90.0},
            "reconstruct": {"engine": "astra", "filter": "hann", "device": "cpu"},
            "denoise": {"enabled": True, "splits": 2, "realizations": 1, "pretrain_channels": 2,
                        "pretrain_epochs": 1, "finetune_epochs": 0, "features": 4, "seed": 3, "engine": "astra"},
            "train": {"n": 300, "ensemble": 3, "epochs": 1, "batch": 64, "seed": 1, "outputs": ["scale"],
                      "parallel": False},
            "analyse": {"ensemble": 2, "batch": 512},
            "fit": {"enabled": True, "sample": 0.03, "seed": 2, "max_iterations": 15, "batch": 64},
            "fit_compare": {"sigma": 3.0},
            "report": {"rois": {}, "pitch": 0.5},
        },
        "cycles": [{"cycle": 2, "datasets": [{"id": "d1", "state": "charged", "voltage": 4.2,
                                              "raw": str(beamtime / "raw.nxs")}]}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_campaign(load_spec(str(path)))
    assert result.ok, result

    ws = tmp_path / "work" / "datasets" / "d1"
    stores = {name: str(ws / f"{name}.zarr") for name in ("integrate", "sinogram", "absorption", "reconstruct",
                                                          "denoise", "analyse")}
    assert all(storage.is_complete(u) for u in stores.values()), os.listdir(ws)
    integ = _config(stores["integrate"])
    assert (integ["method"], integ["sigma_clip_threshold"], integ["polarization_factor"]) == ("sigma_clip", 4.0, 0.95)
    assert integ["frames_per_chunk"] == 7
    assert storage.open_store(stores["integrate"])["intensity"].data.chunksize[0] == 7
    sino = _config(stores["sinogram"])
    assert (sino["air_columns"], sino["angle_tolerance"]) == (1, 0.05)
    absn = _config(stores["absorption"])
    assert absn["min_transmission"] == 0.01 and absn["energy_kev"] == 90.0 and absn["mu"].endswith("mu.npy")
    recon = _config(stores["reconstruct"])
    assert (recon["engine"], recon["filter"], recon["device"]) == ("astra", "hann", "cpu")
    den = _config(stores["denoise"])
    assert (den["method"], den["splits"], den["features"], den["engine"]) == ("noise2inverse", 2, 4, "astra")
    maps = storage.open_store(stores["analyse"])
    assert json.loads(maps.attrs["config"])["ensemble"] == 2 and maps.attrs["ensemble"] == 2
    assert "weight_fraction" in maps and set(maps["phase"].values) == {"NCA", "Al", "Cu"}
    fit = storage.open_store(str(ws / "fit.zarr"))
    fit_cfg = _config(str(ws / "fit.zarr"))
    assert (fit_cfg["sample"], fit_cfg["seed"], fit_cfg["max_iterations"]) == (0.03, 2, 15)
    fitted = np.isfinite(fit["rwp"].values)
    assert 0 < fitted.mean() < 0.1 and float(np.nanmin(fit["scale"].values)) >= 0
    assert _config(str(ws / "fit-compare.zarr"))["sigma"] == 3.0
    assert result.maps["d1"] == stores["analyse"]  # the fit checks the maps; they stay the dataset's result
    report = tmp_path / "work" / "report"
    assert storage.is_complete(str(report))
    html = (report / "report.html").read_text()
    assert "Full-profile fit against PQ-Net" in html and "Cramér–Rao bound" in html
    assert storage.read_marker(str(report))["config"]["pitch"] == 0.5
    model = [p for p in (tmp_path / "work").rglob("model*") if p.is_dir()]
    assert model, list((tmp_path / "work").iterdir())
