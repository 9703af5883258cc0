"""``xrdscale simulate …`` commands."""

from __future__ import annotations

import os

import typer

app = typer.Typer(help="Simulate phases, patterns and whole beamtimes with known truth.", no_args_is_help=True)


@app.command("beamtime")
def beamtime_cmd(
    out: str = typer.Argument(..., help="Output folder: a local path or an fsspec URL (s3://bucket/prefix, memory://…)."),
    preset: str = typer.Option("demo", "--preset", help="demo (1 cycle × 3 voltages, seconds), lattice (one "
                               "3.4 V dataset whose cathode has a radial NCA lattice gradient), scale (one "
                               "dataset at the paper's 637 × 400 scan on the demo detector), "
                               "scale-quarter (a quarter of its frames) or paper "
                               "(637 × 400 scan, Pilatus 2M, 6 voltages; hours)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantom, I0 fluctuations and counting noise."),
) -> None:
    """Simulate a whole beamtime: raw NeXus datasets, PONI, mask, CeO2 frame, phase library, truth stores
    and a campaign spec (OUT/jobs/<preset>-18650.yaml)."""
    from xrdscale.simulate.beamtime import simulate_beamtime

    spec = simulate_beamtime(out, preset, seed, progress=True)
    typer.echo(f"beamtime written to {out}; campaign spec: {spec}")


@app.command("phantom")
def phantom_cmd(
    out: str = typer.Argument(..., help="Destination of the phantom store (zarr; local path or fsspec URL)."),
    size: int = typer.Option(64, "--size", help="Voxels per side (637 at paper scale)."),
    voltage: float = typer.Option(2.65, "--voltage", help="Cell voltage in [2.65, 4.2] V."),
    seed: int = typer.Option(0, "--seed", help="Seed of the grain domains and their parameters."),
) -> None:
    """Write the 18650 phantom's maps (scale, a, c, size, weight_fraction, region, layer, al_tab_roi)."""
    from xrdscale.io import storage
    from xrdscale.simulate.phantom import make_phantom

    ph = make_phantom(size, voltage=voltage, seed=seed)
    storage.write_store(ph, out, stage="truth", config={"size": size, "voltage": voltage, "seed": seed})
    typer.echo(f"phantom {size}² at {voltage} V written to {out}")


@app.command("scan")
def scan_cmd(
    raw: str = typer.Argument(..., help="Destination of the raw NeXus file (…/name.nxs; local path or fsspec URL)."),
    size: int = typer.Option(48, "--size", help="Phantom size = translation steps per line."),
    angles: int = typer.Option(40, "--angles", help="Projections over [0, 180), a multiple of --subsets."),
    subsets: int = typer.Option(4, "--subsets", help="Interlaced angular subsets."),
    voltage: float = typer.Option(2.65, "--voltage", help="Cell voltage in [2.65, 4.2] V."),
    detector: str = typer.Option("demo", "--detector", help="demo (128×128 px) or pilatus2m."),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantom and the noise."),
) -> None:
    """Scan one phantom: write RAW, and beside it <name>.truth.zarr, <name>.poni and <name>.mask.edf."""
    import numpy as np

    from xrdscale.physics.pattern import Instrument
    from xrdscale.simulate.beamtime import LIBRARY_Q, PRESETS, WAVELENGTH, make_detector, write_geometry
    from xrdscale.simulate.phantom import make_phantom
    from xrdscale.simulate.scan import scan_phantom

    stem = os.path.splitext(raw)[0]
    det = make_detector(detector, seed=seed)
    preset = PRESETS["demo" if detector == "demo" else "paper"]
    write_geometry(det, f"{stem}.poni", f"{stem}.mask.edf")
    ph = make_phantom(size, voltage=voltage, seed=seed)
    scan_phantom(ph, raw, f"{stem}.truth.zarr", det, Instrument(WAVELENGTH, *preset.instrument), n_angles=angles,
                 subsets=subsets, truth_q=np.linspace(*LIBRARY_Q), seed=seed, progress=True)
    typer.echo(f"scan written to {raw} (truth {stem}.truth.zarr, geometry {stem}.poni)")


def register(root: typer.Typer) -> None:
    """Add the ``simulate`` sub-app to the ``xrdscale`` command line."""
    root.add_typer(app, name="simulate")
