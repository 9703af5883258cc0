#!/usr/bin/env bash
# Operando point scans (the paper's Figure 3): a simulated cell cycled twice at 1C while the beam
# measures one point of its anode every minute, through PQ-Net to weight fractions over time
# against the voltage curve (~2 minutes on 2 cores). Run from the repository root inside .venv.
set -euo pipefail
OUT=${1:-operando}
xrdscale operando simulate "$OUT" --interval 60 --cycles 2 --seed 0
# the 4LiCx model of the paper's point scans (LiC6, LiC12, LiC30, graphite over q 1.6-2.22 1/Å)
xrdscale pqnet library xrdscale/data/phases/licx4.yaml "$OUT/work/library.zarr" --n 4000
xrdscale pqnet train "$OUT/work/library.zarr" "$OUT/work/model" --ensemble 2 --epochs 15 --outputs scale \
    --no-parallel --bounds 0
# raw frames + echem log -> patterns -> PQ-Net -> weight fractions -> report (MAE against the truth)
xrdscale operando run "$OUT/raw/operando.nxs" "$OUT/echem/cell.csv" "$OUT/work" --model "$OUT/work/model" \
    --poni "$OUT/calib/operando.poni" --mask "$OUT/calib/mask.edf" --truth "$OUT/truth/operando.zarr"
# redraw the report from the store, and check the files against their contracts
xrdscale operando report "$OUT/work/operando.zarr" --out "$OUT/work/report-nexus" --truth "$OUT/truth/operando.zarr"
xrdscale check "$OUT/raw/operando.nxs" "$OUT/work/patterns.zarr" "$OUT/work/operando.zarr" "$OUT/truth/operando.zarr"
echo "report: $OUT/work/report/report.html  per-frame table: $OUT/work/report/fractions.csv"
