"""Benchmark: xrdscale's analysis stages vs the bare library calls they wrap, on the same maps.

On a simulated cell's maps (13 phases, ``--size`` pixels a side) it times, in one run:

- unrolling: ``xrdscale.analysis.unroll.unroll`` (dask, block per phase chunk) vs a bare
  loop of :func:`scipy.ndimage.map_coordinates` (order 1) over the phases on the same grid;
- weight fractions: ``weight_fractions`` (lazy xarray/dask: per-pixel lattice, first-order
  uncertainty) vs the same formula in plain in-memory numpy on the same arrays;
- ROI table: ``roi_table`` (every map variable) vs bare numpy masked means/stds;
- figures: ``plots.map_grid`` vs a bare matplotlib loop (imshow + colorbar per phase, savefig).

It prints the absolute rates and the ratios (xrdscale / bare).

    python benchmarks/analysis.py            # 256² maps
    python benchmarks/analysis.py --quick    # 64² maps
"""

from __future__ import annotations

import argparse
import io
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from xrdscale.analysis import plots  # noqa: E402
from xrdscale.analysis.fractions import weight_fractions  # noqa: E402
from xrdscale.analysis.roi import build_rois, default_rois, roi_table  # noqa: E402
from xrdscale.analysis.unroll import unroll  # noqa: E402
from xrdscale.simulate.phantom import make_phantom  # noqa: E402
from xrdscale.physics.crystal import builtin_phase  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def report(name: str, unit: str, amount: float, t_x: float, t_bare: float) -> None:
    print(f"{name:16s} xrdscale {amount / t_x:12.1f} {unit}   bare {amount / t_bare:12.1f} {unit}   "
          f"ratio {t_x / t_bare:5.2f}x the bare time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64² maps, one repeat")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    size, repeat = (64, 1) if args.quick else (args.size, 3)
    truth = make_phantom(size, voltage=3.85, seed=0)
    maps = truth[["scale", "a", "c", "size"]].chunk({"phase": -1, "y": max(32, size // 2)})  # like a maps store
    names = [str(p) for p in maps["phase"].values]
    n_phase = len(names)
    print(f"maps {n_phase} phases x {size}² px; {os.cpu_count()} cores")

    centre = tuple(truth.attrs["cell_center_mm"])
    step = float(truth["x"][1] - truth["x"][0])
    n_angles = 720
    un = unroll(maps["scale"], centre, n_angles=n_angles)
    radius, angle = un["radius"].values, np.deg2rad(un["angle"].values)
    y0, x0 = float(truth["y"][0]), float(truth["x"][0])
    iy = (centre[0] + radius[:, None] * np.sin(angle)[None, :] - y0) / step
    ix = (centre[1] + radius[:, None] * np.cos(angle)[None, :] - x0) / step
    scale_np = truth["scale"].values.astype(float)

    def bare_unroll():
        return [ndimage.map_coordinates(scale_np[i], [iy.ravel(), ix.ravel()], order=1, mode="constant",
                                        cval=np.nan, prefilter=False) for i in range(n_phase)]

    report("unroll", "maps/s", n_phase, best_of(lambda: unroll(maps["scale"], centre, n_angles=n_angles).compute(),
                                                repeat), best_of(bare_unroll, repeat))

    phases = {n: builtin_phase(n) for n in names}
    crystalline = [i for i, n in enumerate(names) if n != "separator"]
    k0 = np.array([phases[names[i]].zmv() / phases[names[i]].volume() ** 2 for i in crystalline])[:, None, None]
    # ∂ln V/∂ln a, ∂ln V/∂ln c: 3, 0 (cubic) or 2, 1 (hexagonal/trigonal)
    n_a = np.array([3.0 if len(phases[names[i]].lattice_keys) == 1 else 2.0 for i in crystalline])[:, None, None]
    n_c = np.array([0.0 if len(phases[names[i]].lattice_keys) == 1 else 1.0 for i in crystalline])[:, None, None]
    a0 = np.array([phases[names[i]].lattice["a"] for i in crystalline])[:, None, None]
    c0 = np.array([phases[names[i]].lattice.get("c", 1.0) for i in crystalline])[:, None, None]
    a_np, c_np = truth["a"].values[crystalline].astype(float), truth["c"].values[crystalline].astype(float)
    s_std = 0.05 * scale_np[crystalline]

    def bare_fractions():
        """The same Hill & Howard maths in plain numpy: lattice-corrected ZMV/V², first-order std."""
        with np.errstate(invalid="ignore", divide="ignore"):
            ra = np.where(np.isfinite(a_np), a_np / a0, 1.0)
            rc = np.where(np.isfinite(c_np), c_np / c0, 1.0)
            k = k0 * ra ** -n_a * rc ** -n_c
            u = np.clip(scale_np[crystalline], 0, None) * k
            var_u = (k * s_std) ** 2
            total = u.sum(axis=0)
            w = u / total
            var = ((1 - w) ** 2 * var_u + w**2 * (var_u.sum(axis=0) - var_u)) / total**2
            return w, np.sqrt(var)

    maps["scale_std"] = 0.05 * maps["scale"]
    report("weight fraction", "Mpx/s", size * size / 1e6, best_of(lambda: weight_fractions(maps).compute(), repeat),
           best_of(bare_fractions, repeat))

    rois = build_rois(truth, default_rois(truth))
    masks = rois.values
    stacked = {v: truth[v].values for v in ("scale", "a", "c", "size")}

    def bare_table():
        out = []
        for m in masks:
            for arr in stacked.values():
                sel = arr[:, m]
                out.append((np.nanmean(sel, axis=1), np.nanstd(sel, axis=1)))
        return out

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report("roi table", "tables/s", 1, best_of(lambda: roi_table({"d": maps}, rois), repeat),
               best_of(bare_table, repeat))

    img = truth["scale"].load()

    def bare_figure():
        fig, axes = plt.subplots(4, 4, figsize=(12, 11))
        for ax, i in zip(axes.ravel(), range(n_phase)):
            im = ax.imshow(scale_np[i])
            fig.colorbar(im, ax=ax)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=plots.DPI)
        plt.close(fig)

    report("map figure", "figures/s", 1, best_of(lambda: plots.map_grid(img, title="scale", units="a.u."), repeat),
           best_of(bare_figure, repeat))


if __name__ == "__main__":
    main()
