"""Check the e2e campaign's maps on the host: every dataset's analyse store is complete and a
valid maps store (xrdscale.io.storage, xrdscale.io.contracts through `xrdscale check`).

Usage: python check_maps.py CAMPAIGN_SPEC HOST_WORKSPACE   (the pods' /workspace is HOST_WORKSPACE)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import yaml

from xrdscale.io import storage


def main(spec_path: str, host_workspace: str) -> int:
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    work = spec["workspace"].replace("/workspace", host_workspace, 1)
    problems, stores = [], []
    for cycle in spec["cycles"]:
        for ds in cycle["datasets"]:
            url = storage.join(work, "datasets", ds["id"], "analyse.zarr")
            if not storage.is_complete(url):
                problems.append(f"{url}: not marked complete")
                continue
            maps = storage.open_store(url, require_complete=True, stage="maps", dask=False)
            # every phase's scale is predicted (outputs the model lacks, e.g. a size, stay NaN)
            if "scale" not in maps.data_vars:
                problems.append(f"{url}: no scale map in {sorted(maps.data_vars)}")
                continue
            scale = maps["scale"].values
            finite = float(np.isfinite(scale).mean())
            if finite < 0.5:
                problems.append(f"{url}: the scale maps are finite in only {finite:.0%} of their values")
            print(f"maps {ds['id']}: complete ({storage.read_marker(url).get('completed')}), "
                  f"{len(maps.data_vars)} variables, scale {scale.shape} finite {finite:.0%}, "
                  f"mean {float(np.nanmean(scale)):.3g}")
            stores.append(url)
    if stores:
        xrdscale = os.path.join(os.path.dirname(sys.executable), "xrdscale")
        res = subprocess.run([xrdscale, "check", "--kind", "maps", *stores], capture_output=True, text=True)
        print(res.stdout.strip())
        if res.returncode:
            problems.append(f"xrdscale check: {res.stdout.strip()} {res.stderr.strip()[-500:]}")
    for p in problems:
        print("PROBLEM", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
