"""`xrdscale simulate beamtime` end to end (demo preset) and its user errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from xrdscale.io import contracts, storage


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xrdscale.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_beamtime_end_to_end(tmp_path):
    import pyFAI
    from pyFAI.calibrant import CALIBRANT_FACTORY

    from xrdscale.physics.phaselib import PhaseLibrary

    out = tmp_path / "bt"
    proc = cli("simulate", "beamtime", str(out), "--preset", "demo", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    spec_path = out / "jobs" / "demo-18650.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    base = spec_path.parent
    datasets = [d for c in spec["cycles"] for d in c["datasets"]]
    assert [d["voltage"] for d in datasets] == [2.65, 3.85, 4.2]
    ai = pyFAI.load(str(base / spec["geometry"]["poni"]))
    assert ai.wavelength == pytest.approx(0.130509e-10)
    lib = PhaseLibrary.load(str(base / spec["phases"]))
    ranges = yaml.safe_load((base / spec["phases"]).read_text())["phases"]
    for d in datasets:
        raw = base / d["raw"]
        problems = contracts.check_raw(str(raw))
        assert problems == [], problems
        truth = storage.open_store(str(out / "truth" / f"{d['id']}.zarr"), stage="truth")
        assert truth.attrs["voltage"] == d["voltage"]
        # the phase library covers every value of the phantom (absolute scale units)
        for name in lib.phase_names:
            sc = truth.scale.sel(phase=name).values
            lo, hi = ranges[name]["scale"]
            assert sc.min() >= lo and sc.max() <= hi
            for key, var in (("a", "a"), ("c", "c"), ("size_nm", "size")):
                if key in ranges[name]:
                    v = truth[var].sel(phase=name).values
                    v = v[np.isfinite(v)]
                    assert v.size == 0 or (v.min() >= ranges[name][key][0] and v.max() <= ranges[name][key][1])
    # the spec carries training settings sized to the demo: the small ensemble of `xrdscale demo`
    from xrdscale.campaign.spec import load_spec
    from xrdscale.cli.demo import DEMO_PIPELINE
    from xrdscale.simulate.beamtime import PRESETS

    assert spec["pipeline"]["train"] == PRESETS["demo"].train.section() == DEMO_PIPELINE["train"]
    assert load_spec(str(spec_path)).pipeline.train.n == 5000
    # the CeO2 calibration pattern peaks where pyFAI's calibrant library puts the CeO2 lines
    q, inten = np.loadtxt(out / "calib" / "ceo2.txt", unpack=True)
    d_ref = np.array(CALIBRANT_FACTORY("CeO2").dspacing[:6])
    for qp in 2 * np.pi / d_ref:
        if q[0] + 0.05 < qp < q[-1] - 0.05:
            win = np.abs(q - qp) < 0.05
            assert abs(q[win][np.argmax(inten[win])] - qp) < 0.01


def test_every_preset_spec_sizes_its_training_to_its_data():
    """The paper preset asks for the paper's recipe; the demo for minutes on 2 cores; both validate."""
    from xrdscale.campaign.spec import validate_spec
    from xrdscale.simulate.beamtime import PRESETS

    demo, paper = PRESETS["demo"], PRESETS["paper"]
    assert (paper.train.n, paper.train.ensemble, paper.train.epochs) == (200_000, 10, 35)
    assert demo.train.n * demo.train.ensemble * demo.train.epochs <= 100_000    # pattern-epochs of a few minutes
    assert paper.frames_per_dataset == 254_800
    for p in (demo, paper):
        raw = {"version": 1, "campaign": "x", "workspace": "w", "geometry": {"poni": "g.poni"}, "phases": "p.yaml",
               "pipeline": {"train": p.train.section()},
               "cycles": [{"cycle": 1, "datasets": [{"id": "a", "state": "charged", "voltage": 4.2, "raw": "a.nxs"}]}]}
        assert validate_spec(raw).pipeline.train.ensemble == p.train.ensemble


def test_scale_presets_have_the_paper_scan_geometry_on_a_small_detector():
    """`scale` is the paper's scan (637 × 400 in 4 interlaced subsets, zigzag, 30 µm steps over
    19.11 mm) on the demo detector; `scale-quarter` holds a quarter of its frames over the same cell."""
    from xrdscale.simulate.beamtime import PRESETS, make_detector
    from xrdscale.simulate.phantom import default_fov_mm
    from xrdscale.simulate.scan import plan_scan

    full, quarter = PRESETS["scale"], PRESETS["scale-quarter"]
    assert full.frames_per_dataset == PRESETS["paper"].frames_per_dataset == 254_800
    assert make_detector(full.detector).shape == (128, 128)
    step = default_fov_mm(full.size) / full.size
    assert step == pytest.approx(0.030, abs=1e-4)
    plan = plan_scan(full.n_angles, full.size, step, subsets=full.subsets, axis_offset_steps=full.axis_offset_steps)
    assert plan.n_frames == 254_800
    per = full.n_angles // full.subsets                                   # 4 subsets of 100 angles, interlaced
    assert np.allclose(plan.line_angles[per] - plan.line_angles[0], 180.0 / per / full.subsets)
    first, second = plan.translation[:full.size], plan.translation[full.size:2 * full.size]
    assert np.all(np.diff(first) > 0) and np.all(np.diff(second) < 0)   # zigzag
    assert quarter.frames_per_dataset / full.frames_per_dataset == pytest.approx(0.25, abs=0.005)
    assert default_fov_mm(quarter.size) == pytest.approx(default_fov_mm(full.size))


@pytest.mark.parametrize("args, words", [
    (("simulate", "beamtime", "{tmp}/x", "--preset", "huge"), "unknown preset"),
    (("simulate", "beamtime", "{tmp}/file.txt/sub"), "cannot"),
])
def test_bad_beamtime_input_is_one_error_line(tmp_path, args, words):
    (tmp_path / "file.txt").write_text("not a folder")
    proc = cli(*(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], proc.stderr
