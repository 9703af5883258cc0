"""Batched full-profile fitting in torch: the pattern model (:mod:`xrdscale.fitting.torch_model`) and a
vectorised Levenberg–Marquardt (:mod:`xrdscale.fitting.lm`), the conventional reference PQ-Net is checked
against (the ``fit`` stage, :mod:`xrdscale.stages.fit`)."""
