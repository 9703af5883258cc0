"""Lithiation regions of the anode across a voltage series: HL, DL, IN.

Criteria (documented, configurable):

1. **LixC masses**: per pixel and dataset, the mass of each LixC phase, ``scale × ZMV/V²``
   (Hill & Howard, CIF lattice), smoothed with a Gaussian of ``smooth`` pixels so that
   partial-volume pixels at the edge of a thin anode layer borrow from their neighbours.
2. **Anode pixels**: the summed LixC mass, averaged over the series, exceeds
   ``anode_threshold`` × its 99.5th percentile (the anode holds some LixC phase at every voltage).
3. **Stage index** per pixel and dataset: the LixC mass fractions averaged with the position
   of each phase in the charge order graphite 0 → LiC30+ 1 → LiC30 2 → LiC18 3 → LiC12 4 → LiC6 5.
4. **IN** (inactive to lithiation): at the top of charge (highest voltage) the stage index
   stays below ``inactive_below`` (default 2.5: the dilute stages graphite/LiC30+/LiC30 still
   dominate, LiC18 or richer never formed).
5. **DL** (delayed lithiation): not IN, and at some dataset below the top of charge the
   stage index lags the median of the non-IN anode pixels at that voltage by at least
   ``delay`` stages (default 0.5): lithiation reaches each stage later than the median pixel.
6. **HL** (homogeneous lithiation): every other anode pixel.

Codes: HL = 0, DL = 1, IN = 2, −1 outside the anode.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from scipy import ndimage

from xrdscale.analysis.fractions import require, resolve_phases
from xrdscale.exceptions import InputError
from xrdscale.physics.quant import mass_factor

logger = logging.getLogger(__name__)

#: The LixC phases in charge order (index = stage index).
CHARGE_ORDER = ("graphite", "LiC30p", "LiC30", "LiC18", "LiC12", "LiC6")
HL, DL, IN, OUTSIDE = 0, 1, 2, -1
REGION_NAMES = {HL: "HL", DL: "DL", IN: "IN"}


def lixc_mass(maps: xr.Dataset, order: Sequence[str] = CHARGE_ORDER,
              phases: Mapping[str, object] | None = None) -> xr.DataArray:
    """Mass of each LixC phase per pixel (phase, y, x): scale × ZMV/V² at the CIF lattice (Hill & Howard)."""
    require(maps, ["scale"], list(order), what="lithiation regions")
    objs = resolve_phases(list(order), phases)
    k = xr.DataArray([mass_factor(objs[p]) for p in order], dims="phase", coords={"phase": list(order)})
    return maps["scale"].sel(phase=list(order)) * k


def classify_regions(series: Sequence[tuple[float, xr.DataArray | xr.Dataset]], *, anode_threshold: float = 0.3,
                     inactive_below: float = 2.5, delay: float = 0.5, smooth: float = 1.0,
                     order: Sequence[str] = CHARGE_ORDER, phases: Mapping[str, object] | None = None,
                     ids: Sequence[str] | None = None) -> xr.Dataset:
    """Classify each anode pixel as HL/DL/IN from a voltage series of one cycle.

    Parameters
    ----------
    series : sequence of (voltage, maps)
        The ``maps`` of one cycle at each voltage (any order; sorted by voltage here).
    anode_threshold : float
        Anode where the series-mean summed LixC scale exceeds this fraction of its 99.5th percentile.
    inactive_below : float
        IN if the stage index at the top of charge is below this.
    delay : float
        DL if the stage index lags the median by at least this many stages below the top.
    smooth : float
        Gaussian sigma [pixels] applied to the LixC mass maps before the stage index (0: none);
        it averages partial-volume pixels with their anode neighbours.
    order : sequence of str
        LixC phases in charge order.
    phases : mapping, optional
        Phase objects for non-built-in names.
    ids : sequence of str, optional
        Dataset ids, for messages.

    Returns
    -------
    xarray.Dataset
        ``region`` (y, x) int8 (HL 0, DL 1, IN 2, −1 outside the anode) and
        ``stage_index`` (voltage, y, x).

    Raises
    ------
    InputError
        Fewer than two datasets, or maps without the LixC phases.
    """
    ids = list(ids) if ids is not None else [f"#{i}" for i in range(len(series))]
    if len(series) < 2:
        raise InputError(f"lithiation regions need a voltage series of at least 2 datasets of one cycle; "
                         f"got {len(series)} ({', '.join(ids) or 'none'}); add the other voltages of the cycle")
    volts = [float(v) for v, _ in series]
    if len(set(volts)) != len(volts):
        raise InputError(f"the voltage series has repeated voltages {volts} ({', '.join(ids)}); "
                         "give one dataset per voltage")
    order_idx = np.argsort(volts)
    masses = []
    for i in order_idx:
        try:
            masses.append(lixc_mass(series[i][1], order, phases).transpose("phase", "y", "x"))
        except InputError as exc:
            raise InputError(f"dataset {ids[i]} ({volts[i]} V): {exc}") from exc
    first = masses[0]
    # one (voltage, phase, y, x) cube of LixC masses: one 2D image per phase and voltage, small
    mass = np.stack([np.nan_to_num(np.asarray(m.values, dtype=float)) for m in masses])
    if smooth > 0:
        mass = ndimage.gaussian_filter(mass, sigma=(0, 0, smooth, smooth), mode="nearest")
    mass = np.clip(mass, 0.0, None)
    total = mass.sum(axis=1)
    mean_tot = total.mean(axis=0)
    ref = float(np.percentile(mean_tot, 99.5))
    anode = mean_tot > anode_threshold * ref if ref > 0 else np.zeros(mean_tot.shape, bool)
    if not anode.any():
        raise InputError("no anode pixels: the LixC scale maps are empty in every dataset of the series")
    idx = np.arange(len(order), dtype=float)[None, :, None, None]
    sv = (mass * idx).sum(axis=1) / np.where(total > 0, total, 1.0)
    top = sv[-1]
    inactive = anode & (top < inactive_below)
    active = anode & ~inactive
    lag = np.zeros_like(top)
    for k in range(len(sv) - 1):
        if active.any():
            lag = np.maximum(lag, np.median(sv[k][active]) - sv[k])
    delayed = active & (lag >= delay)
    region = np.full(top.shape, OUTSIDE, dtype=np.int8)
    region[anode] = HL
    region[delayed] = DL
    region[inactive] = IN
    coords = {"y": first["y"], "x": first["x"]}
    out = xr.Dataset({
        "region": xr.DataArray(region, dims=("y", "x"), coords=coords,
                               attrs={"flag_values": [OUTSIDE, HL, DL, IN], "flag_meanings": "outside HL DL IN"}),
        "stage_index": xr.DataArray(sv, dims=("voltage", "y", "x"),
                                    coords={"voltage": [volts[i] for i in order_idx], **coords}),
    })
    out.attrs.update(criteria=__doc__.split("Criteria (documented, configurable):", 1)[1].split("Codes:")[0].strip(),
                     anode_threshold=anode_threshold, inactive_below=inactive_below, delay=delay,
                     charge_order=list(order))
    counts = {REGION_NAMES[c]: int((region == c).sum()) for c in (HL, DL, IN)}
    logger.info("lithiation regions over %d datasets: %s", len(series), counts)
    return out
