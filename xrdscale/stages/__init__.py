"""The stages of xrdscale: one module per stage, each a config model and a lazy transform.

:data:`STAGES` is the table of the array stages that the command line is built from
(:mod:`xrdscale.cli.stages`); the campaign's stage graph (:mod:`xrdscale.campaign.stages`)
passes the same config objects (``pipeline.<stage>``) to the same functions. Importing
this package is light: the table names modules, it does not import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    """A positional argument or an extra option of a stage command (not a config field)."""

    name: str
    help: str
    option: bool = False
    required: bool = True
    many: bool = False  #: a list: the remaining positional arguments, or a repeatable option


@dataclass(frozen=True)
class StageDef:
    """How a stage appears on the command line.

    Attributes
    ----------
    name : str
        Command name.
    config : str
        ``module:Class`` of the stage's config model.
    run : str
        ``module:function`` of the stage; called as ``run(*arguments, config=…, client=…, **extras)``.
    params : sequence of Param
        Its positional arguments and extra options (inputs such as ``--poni``), in order.
    help : str
        One line of help.
    exclude : frozenset of str
        Config fields the command leaves out.
    group : str, optional
        The command group it belongs to (``cdi`` → ``xrdscale cdi <name>``); None: top level.
    """

    name: str
    config: str
    run: str
    params: Sequence[Param]
    help: str
    exclude: frozenset[str] = field(default_factory=frozenset)
    group: str | None = None


STAGES: tuple[StageDef, ...] = (
    StageDef("integrate", "xrdscale.stages.integrate:IntegrateConfig", "xrdscale.stages.integrate:integrate", (
        Param("raw", "Raw NeXus/HDF5 file, or a folder/glob of CBF/EDF frames (any fsspec URL)."),
        Param("out", "Output patterns store (zarr; local path or s3://…)."),
        Param("poni", "pyFAI PONI file of the detector geometry.", option=True),
        Param("mask", "Mask image (EDF/TIFF/CBF/NPY, nonzero = masked).", option=True, required=False),
        Param("positioners", "CSV positioner table (angle, translation, monitor[, file]) of a frame series.",
              option=True, required=False),
    ), "Azimuthally integrate every frame of a raw dataset into a patterns store (frame, q), divided by I0."),
    StageDef("sinogram", "xrdscale.stages.sinogram:SinogramConfig", "xrdscale.stages.sinogram:build_sinogram", (
        Param("patterns", "Input patterns store (from `xrdscale integrate`)."),
        Param("out", "Output sinogram store (zarr; local path or s3://…)."),
    ), "Place patterns by their positioners into sinograms (angle, translation, q), centred, air subtracted."),
    StageDef("absorption", "xrdscale.stages.absorption:AbsorptionConfig",
                 "xrdscale.stages.absorption:correct_absorption", (
                     Param("sinogram", "Input sinogram store."),
                     Param("out", "Output (corrected) sinogram store."),
                 ), "Zero-order self-absorption correction: divide every ray by its transmission exp(-∫μ dl).",
                 exclude=frozenset({"enabled"})),
    StageDef("reconstruct", "xrdscale.stages.reconstruct:ReconstructConfig",
                 "xrdscale.stages.reconstruct:reconstruct", (
                     Param("sinogram", "URL of the sinogram store (angle, translation, q)."),
                     Param("out", "URL of the volume store to write (y, x, q)."),
                 ), "Reconstruct every q channel of a sinogram store into a volume store."),
    StageDef("denoise", "xrdscale.stages.denoise:DenoiseConfig", "xrdscale.stages.denoise:denoise", (
        Param("sinogram", "URL of the sinogram store the volume was reconstructed from."),
        Param("volume", "URL of its volume store."),
        Param("out", "URL of the denoised volume store to write."),
    ), "Noise2Inverse denoising: train a U-Net on X:1 splits of the projections, apply it to every channel.",
        exclude=frozenset({"enabled"})),
    StageDef("reconstruct", "xrdscale.stages.cdi:CdiConfig", "xrdscale.stages.cdi:reconstruct", (
        Param("data", "3D Bragg pattern: .npy, HDF5, CXI, or NeXus rocking-curve scans (repeated scans summed)."),
        Param("out", "CXI file to write (entry_1/image_1/data: the complex object; support; chi2)."),
        Param("mask", "Detector mask (a frame or a volume; nonzero = not measured).", option=True, required=False),
        Param("support", "Initial support (3D array of the data's shape; nonzero = inside).", option=True,
              required=False),
    ), "Phase retrieval of one Bragg CDI pattern (HIO/RAAR/ER, shrink-wrap, batched random starts) to CXI.",
        exclude=frozenset({"starts_per_task", "series_start"}), group="cdi"),
    StageDef("series", "xrdscale.stages.cdi:CdiConfig", "xrdscale.stages.cdi:series", (
        Param("data", "One pattern per charge state, in order (the first is the reference).", many=True),
        Param("out", "cdi-series store to write (zarr; Table 1 also as table1.csv inside it)."),
        Param("mask", "Detector mask shared by the states.", option=True, required=False),
        Param("support", "Initial support shared by the states.", option=True, required=False),
        Param("labels", "Label of each state, in order (repeat the option; default: file names).", option=True,
              required=False, many=True),
    ), "A charge-state series: every state phased, aligned to the first, strain, PCA (Eqs. 2-4), Table 1.",
        group="cdi"),
    StageDef("emr", "xrdscale.stages.xcs:XcsConfig", "xrdscale.stages.xcs:emr_maps", (
        Param("cubes", "One spectrum cube per state: HDF5/NeXus (spectra (y, x, bin) or (plane, y, x, bin), energy "
                       "in keV), HEXITEC .hxt, or plane files joined by commas.", many=True),
        Param("out", "xcs store to write (zarr; per-region table also as regions.csv inside it)."),
        Param("labels", "Label of each state, in order (repeat the option; default: file names).", option=True,
              required=False, many=True),
        Param("mask", "Pixel mask (.npy or HDF5, y × x, nonzero = excluded).", option=True, required=False),
    ), "EMR = counts(|p_z|<1)/counts(1<|p_z|<5) per pixel and region, Compton peaks, profiles J(p_z).",
        group="xcs"),
    StageDef("lithium", "xrdscale.stages.xcs:LithiumConfig", "xrdscale.stages.xcs:lithium", (
        Param("emr_store", "xcs store from `xrdscale xcs emr`."),
        Param("calibration", "Calibration JSON from `xrdscale xcs calibrate` (or a CSV of emr, x points)."),
        Param("out", "xcs store to write, with x_li and x_li_std (state, y, x)."),
    ), "Li stoichiometry maps x = a + b·EMR of an xcs store, with σ from the EMR and the calibration.",
        group="xcs"),
    StageDef("reconstruct", "xrdscale.stages.ct:CtConfig", "xrdscale.stages.ct:reconstruct", (
        Param("projections", "Projections: NXtomo (data, image_key, rotation_angle) or HDF5 with projections, "
                             "flats, darks, angles."),
        Param("out", "ct-volume store to write (zarr, attenuation (z, y, x))."),
        Param("flats", "Flat fields from another HDF5 file (frames, row, col).", option=True, required=False),
        Param("darks", "Dark fields from another HDF5 file.", option=True, required=False),
    ), "Absorption CT: flat/dark, -log, ring removal (algotom), centre of rotation, ASTRA FBP slice by slice.",
        group="ct"),
    StageDef("roughness", "xrdscale.stages.ct:RoughnessConfig", "xrdscale.stages.ct:roughness", (
        Param("volume", "ct-volume store from `xrdscale ct reconstruct`."),
        Param("out", "ct-roughness store to write (height maps, R_a, volume fractions; roughness.csv inside)."),
    ), "Segment a cell volume; anode/SPE and cathode/SPE height maps, R_a (ISO 4287), volume fractions.",
        group="ct"),
    StageDef("run", "xrdscale.stages.fit:FitConfig", "xrdscale.stages.fit:fit_maps", (
        Param("source", "PQ-Net model registry entry (its predictions start the fit) or phase-library YAML."),
        Param("data", "Patterns (frame, q) or volume (y, x, q) store to fit."),
        Param("out", "Output maps store (scale, a, c, size with _std, rwp, chi2, converged, iterations)."),
        Param("phases", "Phase library to fit with, when SOURCE is a model (default: the model's).", option=True,
              required=False),
    ), "Full-profile fit (batched Levenberg-Marquardt in torch) of every pixel: the reference for PQ-Net.",
        exclude=frozenset({"enabled"}), group="fit"),
    StageDef("compare", "xrdscale.stages.fit:FitCompareConfig", "xrdscale.stages.fit:fit_compare", (
        Param("maps_a", "First maps store (e.g. from `xrdscale fit run`)."),
        Param("maps_b", "Second maps store (e.g. from `xrdscale analyse`)."),
        Param("out", "Output store: <name>_diff maps (a - b) and compare.csv (bias, MAE, fraction beyond sigma)."),
    ), "Compare two maps stores: difference maps and per phase and parameter bias, MAE, disagreement.",
        group="fit"),
    StageDef("analyse", "xrdscale.stages.analyse:AnalyseConfig", "xrdscale.stages.operando:operando", (
        Param("model_url", "PQ-Net model registry entry (e.g. trained on xrdscale/data/phases/licx4.yaml)."),
        Param("patterns_url", "Patterns store of the scans, with a time (frame) coordinate (`xrdscale integrate`)."),
        Param("echem_url", "Electrochemistry log: CSV (time, voltage, current columns) or FILE.nxs::/entry/echem."),
        Param("out_url", "Output operando store (zarr): weight fractions with std, voltage, current, cycle per frame."),
    ), "Weight fractions over time of timed point/line scans with the cell's voltage, current and cycle.",
        group="operando"),
)


def load(ref: str) -> Any:
    """The object named by ``module:attribute``."""
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
