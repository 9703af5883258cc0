"""Spectra cubes in and out (HDF5/NeXus, HEXITEC .hxt), energy calibration, bad pixels and the simulated cell."""

from __future__ import annotations

import pickle
import struct

import h5py
import numpy as np
import pytest

from xrdscale.exceptions import InputError
from xrdscale.xcs import physics, simulate, spectra

SHAPE = (6, 5, 300)


def _energy(bins: int = SHAPE[2]) -> np.ndarray:
    return np.linspace(5.0, 120.0, bins)


def _counts(rng, shape=SHAPE) -> np.ndarray:
    return rng.poisson(20.0, size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# HDF5


def test_hdf5_round_trip_3d(tmp_path, rng):
    counts = _counts(rng)
    mask = np.zeros(SHAPE[:2], bool)
    mask[2, 3] = True
    url = spectra.write_cube(str(tmp_path / "a.h5"), counts, _energy(), mask=mask, attrs={"incident_kev": 115.0})
    cube = spectra.open_cube(url, chunk_rows=4)
    assert cube.counts.shape == (1, *SHAPE) and cube.counts.chunks[1] == (4, 2)
    assert cube.planes == ("plane",)
    np.testing.assert_array_equal(cube.counts.compute()[0], counts)
    np.testing.assert_array_equal(cube.energy, _energy())
    np.testing.assert_array_equal(cube.mask, mask)
    assert cube.meta["format"] == "hdf5" and cube.meta["attrs"]["incident_kev"] == 115.0
    assert "xrdscale_version" in cube.meta["attrs"]
    edges = cube.edges
    assert edges.shape == (SHAPE[2] + 1,)
    np.testing.assert_allclose(0.5 * (edges[1:] + edges[:-1]), cube.energy)
    assert spectra.open_cube(url, plane_name="R3").planes == ("R3",)


def test_hdf5_round_trip_4d_planes_and_charge_sharing(tmp_path, rng):
    counts = _counts(rng, (3, *SHAPE))
    corrected = np.floor(counts * 0.9)
    url = spectra.write_cube(str(tmp_path / "b.h5"), counts, _energy(), planes=("R1", "R2", "R3"),
                             corrected=corrected)
    auto = spectra.read_cube(url)
    assert auto.planes == ("R1", "R2", "R3") and auto.mask is None
    assert isinstance(auto.counts, np.ndarray) and auto.counts.shape == (3, *SHAPE)
    np.testing.assert_array_equal(auto.counts, corrected)
    assert auto.meta["charge_sharing"] == "corrected"
    np.testing.assert_array_equal(spectra.read_cube(url, charge_sharing="corrected").counts, corrected)
    raw = spectra.read_cube(url, charge_sharing="raw")
    np.testing.assert_array_equal(raw.counts, counts)
    assert raw.meta["charge_sharing"] == "raw"

    plain = spectra.write_cube(str(tmp_path / "c.h5"), counts, _energy())
    assert spectra.open_cube(plain).planes == ("plane_0", "plane_1", "plane_2")
    assert spectra.open_cube(plain).meta["charge_sharing"] == "raw"
    with pytest.raises(InputError, match="no charge-sharing-corrected spectra.*energy, spectra"):
        spectra.open_cube(plain, charge_sharing="corrected")


def test_graph_is_picklable(tmp_path, rng):
    counts = _counts(rng, (2, *SHAPE))
    url = spectra.write_cube(str(tmp_path / "p.h5"), counts, _energy(), planes=("R1", "R2"))
    cube = spectra.open_cube(url, chunk_rows=2)
    again = pickle.loads(pickle.dumps(cube.counts))
    np.testing.assert_array_equal(again.compute(scheduler="synchronous"), counts)


def test_nexus_nested_and_dataset_override(tmp_path, rng):
    counts = _counts(rng, (2, *SHAPE)).astype(np.uint16)
    path = tmp_path / "scan.nxs"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("other", data=np.zeros(3))
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["incident_kev"] = 115.0
        data.create_dataset("spectra", data=counts)
        data.create_dataset("energy", data=_energy())
        data.create_dataset("planes", data=np.array(["R1", "R3"], dtype=object), dtype=h5py.string_dtype())
        data.create_dataset("mask", data=np.eye(*SHAPE[:2], dtype=np.uint8))
        data.create_dataset("alt", data=counts[:, :, :, ::-1].copy())
    cube = spectra.read_cube(str(path))
    assert cube.meta["dataset"] == "entry/data/spectra"
    assert cube.planes == ("R1", "R3") and cube.counts.dtype == np.uint16
    np.testing.assert_array_equal(cube.counts, counts)
    np.testing.assert_array_equal(cube.mask, np.eye(*SHAPE[:2], dtype=bool))
    assert cube.meta["attrs"]["incident_kev"] == 115.0
    alt = spectra.read_cube(str(path), dataset="/entry/data/alt")
    np.testing.assert_array_equal(alt.counts, counts[..., ::-1])


def test_hdf5_errors(tmp_path, rng):
    with pytest.raises(InputError, match="no file at"):
        spectra.open_cube(str(tmp_path / "missing.h5"))
    path = tmp_path / "nospectra.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("image", data=np.zeros((3, 3)))
        h5.create_dataset("energy", data=np.arange(3.0))
    with pytest.raises(InputError, match="no 'spectra' dataset.*image"):
        spectra.open_cube(str(path))
    with pytest.raises(InputError, match="no dataset 'nope'"):
        spectra.open_cube(str(path), dataset="nope")
    bad = tmp_path / "mismatch.h5"
    with h5py.File(bad, "w") as h5:
        h5.create_dataset("spectra", data=_counts(rng))
        h5.create_dataset("energy", data=_energy(SHAPE[2] - 1))
    with pytest.raises(InputError, match="spectra have 300 bins"):
        spectra.open_cube(str(bad))
    dec = tmp_path / "decreasing.h5"
    with h5py.File(dec, "w") as h5:
        h5.create_dataset("spectra", data=_counts(rng))
        h5.create_dataset("energy", data=_energy()[::-1])
    with pytest.raises(InputError, match="strictly increasing"):
        spectra.open_cube(str(dec))
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as h5:
        h5.create_dataset("spectra", data=np.zeros((5, 300)))
        h5.create_dataset("energy", data=_energy())
    with pytest.raises(InputError, match=r"\(y, x, bin\)"):
        spectra.open_cube(str(flat))
    other = tmp_path / "x.dat"
    other.write_bytes(b"GARBAGE!" * 4)
    with pytest.raises(InputError, match="neither HDF5"):
        spectra.open_cube(str(other))


def test_negative_counts_raise_when_computed(tmp_path, rng):
    counts = _counts(rng).astype(np.float64)
    counts[4, 1, 7] = -3.0
    path = tmp_path / "neg.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("spectra", data=counts)
        h5.create_dataset("energy", data=_energy())
    cube = spectra.open_cube(str(path), chunk_rows=2)  # lazy: opening works
    cube.counts[:, :4].compute()  # the rows without the bad value are fine
    with pytest.raises(InputError, match="negative counts in rows 4-5"):
        cube.counts.sum().compute()
    with pytest.raises(InputError, match="spectra must be counts >= 0"):
        spectra.check_counts(np.array([1.0, np.nan]))
    with pytest.raises(InputError, match="negative counts"):
        spectra.write_cube(str(tmp_path / "w.h5"), counts, _energy())


# --------------------------------------------------------------------------------------------
# HXT


@pytest.mark.parametrize("version", [3, 2])
def test_hxt_round_trip(tmp_path, rng, version):
    counts = _counts(rng).astype(np.float64)
    motors = tuple(range(100, 109))
    stamp = "250301_120000"  # 13 characters: fits both versions
    url = spectra.write_hxt(str(tmp_path / "r1.hxt"), counts, _energy(), version=version, motors=motors,
                            prefix="cell_R1", timestamp=stamp)
    cube = spectra.open_cube(url, chunk_rows=4, plane_name="R1")
    assert cube.planes == ("R1",) and cube.counts.shape == (1, *SHAPE)
    np.testing.assert_array_equal(cube.counts.compute()[0], counts)
    np.testing.assert_array_equal(cube.energy, _energy())
    assert cube.meta["version"] == version and cube.meta["prefix"] == "cell_R1"
    assert cube.meta["timestamp"] == stamp
    assert tuple(cube.meta["motors"].values()) == motors and list(cube.meta["motors"])[0] == "mss_x"
    assert pickle.loads(pickle.dumps(cube.counts)).compute().shape == (1, *SHAPE)


def test_hxt_layout_is_the_documented_one(tmp_path, rng):
    counts = _counts(rng, (2, 3, 4)).astype(np.float64)
    energy = np.array([10.0, 20.0, 30.0, 40.0])
    spectra.write_hxt(str(tmp_path / "v2.hxt"), counts, energy, version=2, prefix="abc", timestamp="T" * 13)
    raw = (tmp_path / "v2.hxt").read_bytes()
    assert raw[:8] == b"HEXITECH" and struct.unpack_from("<Q", raw, 8)[0] == 2
    assert struct.unpack_from("<i", raw, 52)[0] == 3 and raw[56:59] == b"abc"
    assert raw[59:72] == b"T" * 13
    assert struct.unpack_from("<3I", raw, 72) == (2, 3, 4)
    np.testing.assert_array_equal(np.frombuffer(raw, "<f8", 4, 84), energy)
    assert len(raw) == 84 + 32 + counts.size * 8


def test_hxt_errors(tmp_path, rng):
    counts = _counts(rng).astype(np.float64)
    spectra.write_hxt(str(tmp_path / "good.hxt"), counts, _energy())
    raw = (tmp_path / "good.hxt").read_bytes()
    wrong = tmp_path / "wrong.hxt"
    wrong.write_bytes(b"HEXITECX" + raw[8:])
    with pytest.raises(InputError, match="label is b'HEXITECX', expected HEXITECH"):
        spectra.open_cube(str(wrong))
    short = tmp_path / "short.hxt"
    short.write_bytes(raw[:-100])
    expected = SHAPE[0] * SHAPE[1] * SHAPE[2] * 8
    with pytest.raises(InputError, match=f"need {expected} bytes of counts.*the file has {expected - 100}"):
        spectra.open_cube(str(short))
    header = tmp_path / "header.hxt"
    header.write_bytes(raw[:120])
    with pytest.raises(InputError, match="truncated .hxt"):
        spectra.open_cube(str(header))
    v9 = tmp_path / "v9.hxt"
    v9.write_bytes(raw[:8] + struct.pack("<Q", 9) + raw[16:])
    with pytest.raises(InputError, match="version 9 is not supported"):
        spectra.open_cube(str(v9))
    neg = counts.copy()
    neg[0, 0, 0] = -1
    negp = tmp_path / "neg.hxt"
    negp.write_bytes(raw[: len(raw) - counts.nbytes] + neg.tobytes())
    with pytest.raises(InputError, match="negative counts"):
        spectra.read_cube(str(negp))
    with pytest.raises(InputError, match="spectra have 300 bins"):
        spectra.write_hxt(str(tmp_path / "e.hxt"), counts, _energy(299))


# --------------------------------------------------------------------------------------------
# calibration and bad pixels


def _line_spectra(rng, gain, offset, energy, lines, noise=True):
    """Lines at true energies seen by pixels with true = gain * nominal + offset, on a sloping background."""
    nominal = (np.asarray(lines)[:, None, None] - offset) / gain  # where each line appears (nominal keV)
    sigma = 0.35
    e = energy[None, None, :]
    spec = 50.0 + 0.5 * e
    for k in range(len(lines)):
        spec = spec + 4e4 * np.exp(-0.5 * ((e - nominal[k][..., None]) / sigma) ** 2)
    spec = spec * np.ones((*gain.shape, 1))
    return rng.poisson(spec).astype(np.float64) if noise else spec


def test_energy_calibration_recovers_gain_and_offset(rng):
    energy = np.linspace(15.0, 120.0, 1500)
    lines = [23.17, 27.47, 30.99, 115.0]
    gain = 1.0 + rng.uniform(-0.01, 0.01, (4, 3))
    offset = rng.uniform(-0.4, 0.4, (4, 3))
    counts = _line_spectra(rng, gain, offset, energy, lines)
    g, o = spectra.calibrate_energy(counts, energy, {f"l{i}": v for i, v in enumerate(lines)}, window_kev=1.5)
    np.testing.assert_allclose(g, gain, atol=1e-3)
    predicted = g[..., None] * ((np.asarray(lines) - offset[..., None]) / gain[..., None]) + o[..., None]
    np.testing.assert_allclose(predicted, np.broadcast_to(lines, predicted.shape), atol=0.05)
    fixed = spectra.apply_energy_calibration(counts, energy, g, o)
    assert fixed.shape == counts.shape
    np.testing.assert_allclose(fixed.sum(axis=-1), counts.sum(axis=-1), rtol=2e-3)
    # after the rebinning, every pixel's lines sit at their true energies on the common axis
    back_g, back_o = spectra.calibrate_energy(fixed, energy, lines)
    np.testing.assert_allclose(back_g, 1.0, atol=1e-3)
    np.testing.assert_allclose(back_g * 27.47 + back_o, 27.47, atol=0.05)


def test_apply_energy_calibration_conserves_counts_exactly(rng):
    energy = np.linspace(10.0, 60.0, 200)
    counts = np.zeros((2, 2, 200))
    counts[..., 60:140] = rng.poisson(30.0, (2, 2, 80))
    out = spectra.apply_energy_calibration(counts, energy, np.array([[1.0, 1.01], [0.99, 1.0]]),
                                           np.array([[0.0, -0.3], [0.5, 0.2]]))
    np.testing.assert_allclose(out.sum(axis=-1), counts.sum(axis=-1), rtol=1e-12)
    np.testing.assert_allclose(spectra.apply_energy_calibration(counts, energy, 1.0, 0.0), counts, atol=1e-9)
    shifted = spectra.apply_energy_calibration(counts, energy, 1.0, energy[1] - energy[0])  # one bin up
    np.testing.assert_allclose(shifted[..., 1:], counts[..., :-1], atol=1e-9)


def test_calibration_needs_two_lines(rng):
    energy = np.linspace(15.0, 60.0, 300)
    counts = rng.poisson(5.0, (2, 2, 300)).astype(float)
    with pytest.raises(InputError, match="at least two are needed"):
        spectra.calibrate_energy(counts, energy, [23.17, 93.9, 115.0])


def test_bad_pixels(rng):
    total = rng.normal(2e4, 300.0, (20, 20))
    total[3, 4] = 50.0  # dead
    total[10, 10] = 0.0  # dead
    total[15, 2] = 2e4 + 20 * 300.0  # hot
    total[7, 7] = 2e4 + 3 * 300.0  # within the scatter
    mask = spectra.bad_pixels(total)
    assert sorted(map(tuple, np.argwhere(mask).tolist())) == [(3, 4), (10, 10), (15, 2)]
    total[0, 0] = np.nan
    assert spectra.bad_pixels(total)[0, 0]
    assert not spectra.bad_pixels(np.full((4, 4), 7.0)).any()


# --------------------------------------------------------------------------------------------
# the simulated cell


@pytest.fixture(scope="module")
def cell():
    return simulate.simulate_cell(shape=(6, 5), bins=2000, seed=3)


def test_simulated_cell_follows_the_plane_model(cell):
    ex = cell["expected"]
    assert cell["counts"].shape == ex.shape == (3, 6, 5, 2000) and cell["counts"].dtype == np.float32
    comps = cell["components"]
    a, b = cell["alpha"], cell["beta"]
    np.testing.assert_allclose(ex[2], comps["anode"], rtol=1e-12)
    np.testing.assert_allclose(ex[1], comps["spe"] + a * comps["anode"], rtol=1e-12)
    cathode = ex[0] - ex[1] + (a - b) * ex[2]
    np.testing.assert_allclose(cathode, comps["cathode"], rtol=0, atol=1e-9 * comps["cathode"].max())
    assert ex[0].sum(axis=-1).mean() == pytest.approx(2e4)
    # the thickness maps vary laterally
    assert np.ptp(comps["spe"].sum(axis=-1)) > 0.05 * comps["spe"].sum(axis=-1).mean()
    assert np.all(cell["counts"] >= 0) and np.all(cell["counts"] == np.round(cell["counts"]))


def test_simulated_compton_peak_and_lines(cell):
    e = cell["energy"]
    total = cell["expected"].sum(axis=(0, 1, 2))
    sel = (e > 80) & (e < 105)
    assert e[sel][np.argmax(total[sel])] == pytest.approx(93.87, abs=0.2)
    for name, line in physics.fluorescence_lines().items():
        near = np.abs(e - line) < 0.6
        peak = e[near][np.argmax(total[near])]
        assert peak == pytest.approx(line, abs=0.07), name
        assert total[np.argmin(np.abs(e - line))] > 1.3 * total[np.argmin(np.abs(e - (line - 1.2)))], name
    elastic = np.argmin(np.abs(e - 115.0))
    assert total[elastic] > 5 * total[np.argmin(np.abs(e - 113.5))]
    plain = simulate.simulate_cell(shape=(2, 2), bins=2000, fluorescence=False, elastic=False)
    pe = plain["expected"].sum(axis=(0, 1, 2))
    assert pe[elastic] < 0.01 * pe[sel].max()


def _emr(spectrum: np.ndarray, energy: np.ndarray) -> float:
    pz = np.abs(physics.pz_au(115.0, energy, 90.0))
    return float(spectrum[pz < 1].sum() / spectrum[(pz > 1) & (pz < 5)].sum())


def test_more_lithium_gives_a_higher_valence_ratio():
    ratios = []
    for x in (0.2, 0.6, 1.0):
        cell = simulate.simulate_cell(x=x, shape=(2, 2), bins=3000, fluorescence=False, elastic=False)
        ratios.append(_emr(cell["components"]["cathode"].sum(axis=(0, 1)), cell["energy"]))
    assert ratios[0] < ratios[1] < ratios[2]


def test_x_maps():
    grad = simulate.x_map("gradient", (3, 4))
    np.testing.assert_allclose(grad[1], np.linspace(0.3, 1.0, 4))
    cell = simulate.simulate_cell(x=grad, shape=(3, 4), bins=500, seed=1)
    np.testing.assert_array_equal(cell["x"], grad)
    with pytest.raises(InputError, match="detector shape"):
        simulate.simulate_cell(x=np.ones((2, 2)), shape=(3, 4), bins=500)
    with pytest.raises(InputError, match="gradient"):
        simulate.x_map("ramp", (2, 2))


def test_write_cell_round_trip(tmp_path):
    paths = simulate.write_cell(str(tmp_path / "cell"), states=(1.0, "gradient"), labels=("charged", "mixed"),
                                shape=(4, 3), bins=600, hxt=True, seed=5)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["charged.h5", "charged_R1.hxt", "charged_R2.hxt", "charged_R3.hxt", "mixed.h5",
                     "mixed_R1.hxt", "mixed_R2.hxt", "mixed_R3.hxt", "references.csv", "truth.h5"]
    cube = spectra.read_cube(str(tmp_path / "cell" / "mixed.h5"))
    assert cube.planes == ("R1", "R2", "R3") and cube.counts.shape == (3, 4, 3, 600)
    assert cube.meta["attrs"]["x_mean"] == pytest.approx(0.65)
    assert cube.meta["attrs"]["alpha"] == 0.3 and cube.meta["attrs"]["incident_kev"] == 115.0
    again = simulate.simulate_cell(x="gradient", shape=(4, 3), bins=600, seed=6)
    np.testing.assert_array_equal(cube.counts, again["counts"])
    r2 = spectra.read_cube(str(tmp_path / "cell" / "mixed_R2.hxt"), plane_name="R2")
    np.testing.assert_array_equal(r2.counts[0], cube.counts[1])
    with h5py.File(tmp_path / "cell" / "truth.h5") as h5:
        assert [s.decode() for s in h5["labels"][()]] == ["charged", "mixed"]
        np.testing.assert_allclose(h5["x"][1], simulate.x_map("gradient", (4, 3)))
        np.testing.assert_allclose(h5["components/cathode"][1], again["components"]["cathode"].sum(axis=(0, 1)))
        assert h5.attrs["beta"] == 0.2


def test_cubes_at_fsspec_urls(rng):
    counts = _counts(rng, (2, *SHAPE))
    url = spectra.write_cube("memory://xcs-test/cube.h5", counts, _energy(), planes=("R1", "R2"))
    cube = spectra.open_cube(url, chunk_rows=3)
    np.testing.assert_array_equal(cube.counts.compute(scheduler="synchronous"), counts)
    hxt = spectra.write_hxt("memory://xcs-test/r1.hxt", counts[0].astype(np.float64), _energy())
    np.testing.assert_array_equal(spectra.read_cube(hxt, chunk_rows=4).counts[0], counts[0])
    with pytest.raises(InputError, match="no file at memory://xcs-test/none.h5"):
        spectra.open_cube("memory://xcs-test/none.h5")
