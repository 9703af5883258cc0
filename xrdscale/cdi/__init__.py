"""Bragg coherent diffraction imaging (CDI): from a 3D Bragg peak to the phase, displacement and strain of a crystal.

Modules
-------
simulate
    Faceted crystals with displacement phase (domains, vortices, surface shells), their Bragg
    intensity with Poisson noise, and charge-state series of one crystal.
io
    Diffraction patterns in (``.npy``, HDF5, CXI, NeXus rocking-curve scans with repeated scans
    summed), ROI / binning / crop, detector masks; CXI results out and back in.
gridding
    Detector frame (rocking, rows, cols) to an orthogonal lab frame (xrayutilities), voxel
    sizes and the norm of the scattering vector.
fourier
    The one FFT convention of the package: the object's origin at index ``n // 2`` of each axis,
    ``F = fftshift(fftn(ifftshift(obj), norm="ortho"))`` over the last three axes, Bragg peak at
    the array centre.
phasing
    Iterative phase retrieval (HIO, RAAR, ER) with shrink-wrap support, batched random starts.
post
    Twin and phase-ramp removal, alignment and averaging of starts, displacement and strain.
series
    A charge-state series: every state retrieved and the phase changes between states.
cnn
    A network that predicts an initial object from the intensity, refined per pattern.
"""
