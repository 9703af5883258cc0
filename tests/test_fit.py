"""The conventional full-profile fit recovers the parameters of simulated patterns."""

from __future__ import annotations

import numpy as np
import pytest

from xrdscale.exceptions import InputError
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.stages.fit import fit_pattern

LIBRARY = """version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 2.84, npt: 600}
instrument: {W: 4.0e-4}
background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
noise: {counts: [1.0e6, 1.0e6]}
phases:
  NCA: {builtin: NCA, scale: [0.2, 1], a: [2.810, 2.875], c: [14.15, 14.55]}
  Al: {builtin: Al, scale: [0, 0.3]}
  graphite: {builtin: graphite, scale: [0, 1]}
"""


def test_fit_recovers_scales_and_lattice(rng):
    lib = PhaseLibrary.from_text(LIBRARY)
    labels = lib.sample(3, rng)
    patterns = lib.simulate(labels, rng)
    for i in range(3):
        res = fit_pattern(lib, lib.q, patterns[i])
        for name in lib.phase_names:
            assert res.labels[name]["scale"] == pytest.approx(labels[name]["scale"][i], abs=0.01)
        assert res.labels["NCA"]["a"] == pytest.approx(labels["NCA"]["a"][i], abs=0.001)
        assert res.labels["NCA"]["c"] == pytest.approx(labels["NCA"]["c"][i], abs=0.005)
        assert res.rwp < 0.05


def test_fit_rejects_nan():
    lib = PhaseLibrary.from_text(LIBRARY)
    y = np.ones(lib.q.size)
    y[3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_pattern(lib, lib.q, y)
