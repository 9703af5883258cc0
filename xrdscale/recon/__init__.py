"""Reconstruction engines: the geometry, FBP filters and the engine registry.

Every q channel of an XRD-CT sinogram is one parallel-beam tomogram and all channels
share one geometry. :mod:`xrdscale.recon.registry` looks engines up by name
(``astra``: ASTRA per channel; ``batched``: one sparse operator for a whole chunk of
channels); :mod:`xrdscale.stages.reconstruct` runs them chunk-wise on Dask.
"""
