"""The ``reconstruct`` stage: per-channel parallel-beam tomography, sinogram → volume.

Every q channel of the ``sinogram`` store ``(angle, translation, q)`` is one tomogram.
Chunks of channels are reconstructed on Dask by an engine of :mod:`xrdscale.recon`
(FBP or SIRT), written first to a temporary store chunked ``(pixel, pixel, channel)``,
then transposed through zarr into the ``volume`` store ``(y, x, q)`` chunked for
per-pixel access (whole patterns per chunk). No task ever holds more than one chunk of
channels or one block of pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr
from pydantic import Field

from xrdscale.config import one_of
from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.recon.filters import FILTERS
from xrdscale.recon.geometry import Geometry, geometry_from_coords
from xrdscale.recon.registry import ALGORITHMS, DEVICES, ENGINE_NAMES, Engine, Impl, get_engine
from xrdscale.stages.base import StageConfig, guarded, runtime_field, write_output

logger = logging.getLogger(__name__)


Algorithm = Annotated[str, one_of(ALGORITHMS, "reconstruction algorithm")]
Filter = Annotated[str, one_of(FILTERS, "FBP filter")]
EngineName = Annotated[str, one_of(("auto", *ENGINE_NAMES), "reconstruction engine")]
Device = Annotated[str, one_of(DEVICES, "device")]


class ReconstructConfig(StageConfig):
    """Settings of the ``reconstruct`` stage (``pipeline.reconstruct`` of a campaign)."""

    stage: ClassVar[str] = "reconstruct"

    algorithm: Algorithm = Field(
        "fbp", description="filtered back projection or SIRT")
    iterations: int = Field(100, ge=1, description="SIRT iterations (FBP ignores it)")
    filter: Filter = Field("ram-lak", description="FBP filter")
    engine: EngineName = Field(
        "auto", description="auto (batched), astra (one ASTRA call per channel) or batched (one sparse operator "
                            "for a chunk of channels)")
    device: Device = Field("auto", description="auto, cpu or cuda (CUDA falls back to the "
                                                                   "CPU with one INFO line)")
    channels_per_chunk: int | None = runtime_field(None, "channels per task (default: about 64 MiB per task)",
                                                   ge=1)

#: bytes of one chunk of the volume store (whole q axis, a block of pixels)
PIXEL_CHUNK_BYTES = 32 * 2**20
#: bytes of one chunk of channels handed to an engine
CHANNEL_CHUNK_BYTES = 64 * 2**20


def open_sinogram(url: str, *, dask: bool = True) -> tuple[xr.DataArray, Geometry]:
    """Open a ``sinogram`` store and check it against the data contract.

    Parameters
    ----------
    url : str
        URL of a complete ``sinogram`` store.
    dask : bool
        Dask-backed (default) or lazily indexed intensities (see :func:`storage.open_store`).

    Returns
    -------
    intensity : xarray.DataArray
        Lazy ``(angle, translation, q)`` intensities.
    geometry : Geometry
        Its parallel-beam geometry.

    Raises
    ------
    InputError
        Missing variable, wrong dimensions or a geometry that cannot be reconstructed.
    """
    ds = storage.open_store(url, stage="sinogram", dask=dask)
    name = storage.redact(url)
    if "intensity" not in ds:
        raise InputError(f"sinogram {name} has no 'intensity' variable (found {list(ds.data_vars)})")
    intensity = ds["intensity"]
    if intensity.dims != ("angle", "translation", "q"):
        raise InputError(f"sinogram {name}: intensity has dims {intensity.dims}, expected "
                         "('angle', 'translation', 'q'); build it with the sinogram stage")
    geometry = geometry_from_coords(ds["angle"].values, ds["translation"].values, what=f"sinogram {name}")
    return intensity, geometry


def channel_chunk(geometry: Geometry, n_q: int) -> int:
    """Channels per engine call: about :data:`CHANNEL_CHUNK_BYTES` of sinogram + volume."""
    per_channel = 4 * geometry.n_det * (geometry.n_angles + geometry.n_det)
    return int(max(1, min(n_q, CHANNEL_CHUNK_BYTES // per_channel)))


def pixel_chunk(n_det: int, n_q: int) -> int:
    """Pixels per side of a volume chunk holding whole patterns (about 32 MiB)."""
    return int(max(1, min(n_det, math.isqrt(max(1, PIXEL_CHUNK_BYTES // (4 * n_q))))))


def reconstruct_block(block: np.ndarray, *, engine: Engine, geometry: Geometry, algorithm: str,
                      filter_name: str, iterations: int, source: str = "sinogram",
                      q: np.ndarray | None = None) -> np.ndarray:
    """Reconstruct one chunk of channels ``(angle, translation, channel)`` → ``(y, x, channel)``.

    Raises
    ------
    InputError
        The chunk holds NaN or infinite values (the message names the q channels).
    """
    bad = ~np.isfinite(block).all(axis=(0, 1))
    if bad.any():
        where = f"q = {np.round(q[bad][:5], 4).tolist()}" if q is not None else f"{int(bad.sum())} channels"
        raise InputError(f"{source} has NaN or infinite values in {int(bad.sum())} channel(s) ({where}); "
                         "mask or interpolate them in the sinogram stage before reconstructing")
    if algorithm == "fbp":
        return engine.fbp(geometry, block, filter_name).astype(np.float32, copy=False)
    return engine.sirt(geometry, block, iterations).astype(np.float32, copy=False)


def channel_volumes(intensity: xr.DataArray, geometry: Geometry, func, *, chunk: int | None = None,
                    **kwargs: Any) -> da.Array:
    """Lazily apply ``func(block, geometry=..., **kwargs)`` to chunks of channels.

    Parameters
    ----------
    intensity : xarray.DataArray
        ``(angle, translation, q)`` sinograms.
    geometry : Geometry
        Their geometry.
    func : callable
        Maps an ``(angle, translation, channel)`` float32 block to ``(y, x, channel)``.
    chunk : int, optional
        Channels per block (default :func:`channel_chunk`).

    Returns
    -------
    dask.array.Array
        ``(y, x, q)`` float32, chunked ``(n, n, chunk)``.
    """
    n_q = intensity.sizes["q"]
    chunk = chunk or channel_chunk(geometry, n_q)
    # lazily indexed input (open_sinogram(dask=False)): one read task per block of channels
    data = intensity.chunk({"angle": -1, "translation": -1, "q": chunk}).data.astype(np.float32)
    q = intensity["q"].values
    q_blocks = da.from_array(q, chunks=(chunk,))
    n = geometry.n_det

    def _apply(block: np.ndarray, q_block: np.ndarray) -> np.ndarray:
        return func(block, geometry=geometry, q=q_block.ravel(), **kwargs)

    return da.map_blocks(_apply, data, q_blocks[None, None, :], dtype=np.float32,
                         chunks=((n,), (n,), data.chunks[2]), meta=np.empty((0, 0, 0), np.float32))


def write_volume(volume: da.Array, geometry: Geometry, q: xr.DataArray, out_url: str, *, stage: str,
                 config: Mapping[str, Any], client: Any = None, progress: bool = True, label: str = "") -> str:
    """Write ``(y, x, q)`` channel-chunked data as a per-pixel-chunked store at ``out_url``.

    The transpose goes through a temporary zarr store chunked ``(p, p, channel)`` next
    to ``out_url`` (removed afterwards), so neither step holds more than one chunk. The
    temporary store is written uncompressed: reconstructed noise compresses poorly, and
    compressing and decompressing it cost about a quarter of the batched engine's time.
    """
    n_q = volume.shape[2]
    p = pixel_chunk(geometry.n_det, n_q)
    coords = {"y": ("y", geometry.pixel_coords(), {"units": "mm"}),
              "x": ("x", geometry.pixel_coords(), {"units": "mm"}), "q": q}
    tmp_url = out_url.rstrip("/") + ".channels-tmp"
    storage.begin_store(out_url)  # nothing stale at out_url looks complete while we work
    tmp = xr.Dataset({"intensity": (("y", "x", "q"), volume)}, coords=coords)
    label = label or stage
    try:
        write_output(tmp, tmp_url, kind=f"{stage}-channels", config=config, client=client, progress=progress,
                     label=f"{label} (channels)",
                     encoding={"intensity": {"chunks": (p, p, volume.chunksize[2]), "compressors": None}})
        # one task per output chunk reads its pixel tile of every channel block
        staged = storage.open_store(tmp_url, stage=f"{stage}-channels", dask=False)
        out = staged.chunk({"y": p, "x": p, "q": -1})
        out["intensity"].attrs.update({"long_name": "reconstructed intensity per pixel",
                                       "units": "sinogram units per pixel"})
        for var in out.variables.values():
            var.encoding.clear()
        out.attrs.clear()
        write_output(out, out_url, kind=stage, config=config, client=client, progress=progress,
                     label=f"{label} (pixels)", encoding={"intensity": {"chunks": (p, p, n_q)}})
    finally:
        storage.clear(tmp_url)
    return out_url


def reconstruct(sinogram_url: str, out_url: str, *, config: ReconstructConfig | None = None, client: Any = None,
                progress: bool = True, **settings: Any) -> str:
    """Reconstruct every q channel of a sinogram store into a volume store.

    Parameters
    ----------
    sinogram_url : str
        A ``sinogram`` store ``(angle, translation, q)``.
    out_url : str
        Destination of the ``volume`` store ``(y, x, q)``, coordinates in mm.
    config : ReconstructConfig, optional
        ``algorithm`` (fbp, sirt), ``iterations``, ``filter`` (ram-lak, shepp-logan,
        hann), ``engine`` (auto, astra, batched), ``device`` (auto, cpu, cuda),
        ``channels_per_chunk``; keyword ``settings`` of the same names override it.
    client : distributed.Client, optional
        Dask client to run on (default: the current one, or the local scheduler).
    progress : bool
        Show progress.

    Returns
    -------
    str
        ``out_url``.

    Examples
    --------
    >>> reconstruct("work/c1/sinogram.zarr", "work/c1/volume.zarr", algorithm="fbp")  # doctest: +SKIP
    """
    cfg = ReconstructConfig.build(config, **settings)

    def body() -> str:
        intensity, geometry = open_sinogram(sinogram_url, dask=False)
        volume, record = reconstruct_array(intensity, geometry, cfg, source=f"sinogram {storage.redact(sinogram_url)}")
        record["source"] = storage.redact(sinogram_url)
        return write_volume(volume, geometry, intensity["q"], out_url, stage="volume", config=record, client=client,
                            progress=progress, label="reconstruct")

    return guarded(out_url, body)


def reconstruct_array(intensity: xr.DataArray, geometry: Geometry, config: ReconstructConfig, *,
                      source: str = "sinogram") -> tuple[da.Array, dict[str, Any]]:
    """The lazy ``(y, x, q)`` reconstruction of ``(angle, translation, q)`` sinograms, and its record.

    Returns
    -------
    volume : dask.array.Array
        Channel-chunked float32.
    record : dict
        The settings as used (the resolved engine and device included).
    """
    impl_engine = get_engine(Impl(config.engine, config.device))
    record = {**config.record(), "engine": impl_engine.name, "device": impl_engine.device,
              "engine_requested": config.engine, "device_requested": config.device}
    if config.algorithm != "sirt":
        record["iterations"] = None
    if config.algorithm != "fbp":
        record["filter"] = None
    logger.info("reconstructing %d channels of %d × %d angles (%s, %s engine on %s)",
                intensity.sizes["q"], geometry.n_angles, geometry.n_det, config.algorithm, impl_engine.name,
                impl_engine.device)
    volume = channel_volumes(intensity, geometry, reconstruct_block, chunk=config.channels_per_chunk,
                             engine=impl_engine, algorithm=config.algorithm, filter_name=config.filter,
                             iterations=config.iterations, source=source)
    return volume, record
