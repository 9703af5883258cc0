"""The physics every part of xrdscale shares, below everything that uses it.

``constants`` (hc, the 18650 defaults, the separator peak), ``crystal`` (CIF → reflections),
``pattern`` (the pattern model of shared/DESIGN.md, absolute units, K = 1), ``phaselib``
(the phase-library YAML), ``attenuation`` (compositions, μ/ρ, μ maps) and ``quant`` (the
Hill & Howard mass factor). These modules import no simulate, stage, pqnet, campaign or
runtime module (``tests/test_physics.py`` checks it).
"""
