#!/usr/bin/env bash
# Quickstart: one simulated XRD-CT dataset through every stage by hand (~2 minutes on 2 cores).
# Run from the repository root after `make install` (or inside .venv).
set -euo pipefail
OUT=${1:-quickstart}
xrdscale simulate beamtime "$OUT" --preset demo --seed 0
ID=c1-4.20V
xrdscale integrate "$OUT/raw/$ID.nxs" "$OUT/work/$ID/patterns.zarr" --poni "$OUT/calib/demo.poni" \
    --mask "$OUT/calib/mask.edf" --npt 1000 --q-range 1.16 3.82 --method trimmed_mean --percentile 10 90
xrdscale sinogram "$OUT/work/$ID/patterns.zarr" "$OUT/work/$ID/sinogram.zarr" --center auto
xrdscale reconstruct "$OUT/work/$ID/sinogram.zarr" "$OUT/work/$ID/volume.zarr" --algorithm fbp
xrdscale pqnet library "$OUT/phases/cell18650.yaml" "$OUT/work/library.zarr" --n 3000
xrdscale pqnet train "$OUT/work/library.zarr" "$OUT/work/model" --ensemble 2 --epochs 5 --outputs scale
xrdscale pqnet predict "$OUT/work/model" "$OUT/work/$ID/volume.zarr" "$OUT/work/$ID/maps.zarr"
xrdscale report "$OUT/work/$ID/maps.zarr" "$OUT/work/report"
# every input and output against its data contract (exits 1 naming any problem)
xrdscale check "$OUT/jobs/demo-18650.yaml" "$OUT/phases/cell18650.yaml" "$OUT/raw/$ID.nxs" \
    "$OUT/work/$ID/patterns.zarr" "$OUT/work/$ID/sinogram.zarr" "$OUT/work/$ID/volume.zarr" \
    "$OUT/work/model" "$OUT/work/$ID/maps.zarr" "$OUT/truth/$ID.zarr"
echo "maps: $OUT/work/$ID/maps.zarr  report: $OUT/work/report/report.html  truth: $OUT/truth/$ID.zarr"
