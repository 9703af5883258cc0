"""Your own phases: a phase library, simulated patterns, and the conventional fit of one.

Run: python examples/custom_phases.py
"""

import numpy as np

from xrdscale.stages.fit import fit_pattern
from xrdscale.physics.phaselib import PhaseLibrary

LIBRARY = """
version: 1
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

lib = PhaseLibrary.from_text(LIBRARY)   # PhaseLibrary.load("my_phases.yaml") for a file with CIFs beside it
rng = np.random.default_rng(0)
labels = lib.sample(1, rng)
pattern = lib.simulate(labels, rng)[0]
result = fit_pattern(lib, lib.q, pattern)
for name in lib.phase_names:
    print(f"{name:9s} scale true {labels[name]['scale'][0]:.3f} fitted {result.labels[name]['scale']:.3f}")
print(f"NCA a true {labels['NCA']['a'][0]:.4f} fitted {result.labels['NCA']['a']:.4f} Å; Rwp {result.rwp:.3f}")
