"""Bragg CDI data: simulated crystals and series, pattern readers and writers, detector geometry and gridding."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import Delaunay

from xrdscale.cdi import gridding, io, simulate
from xrdscale.exceptions import InputError

N = 32
SHAPE = (N, N, N)
GEOMETRY = {"energy_kev": 13.5, "two_theta_deg": 28.8, "distance_m": 1.0, "pixel_um": 55.0,
            "rocking_step_deg": 0.01}


def _extent(mask: np.ndarray) -> list[int]:
    idx = np.nonzero(mask)
    return [int(i.max() - i.min() + 1) for i in idx]


def _bbox_centre(mask: np.ndarray) -> list[float]:
    idx = np.nonzero(mask)
    return [(int(i.max()) + int(i.min())) / 2 for i in idx]


def _far_field(obj: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(obj), norm="ortho"))


# ------------------------------------------------------------------------------------------
# crystal_support


@pytest.mark.parametrize("facets", ["hexagonal", "box", 12])
def test_support_is_centred_sized_and_oversampled(facets):
    support = simulate.crystal_support(SHAPE, size=0.4, facets=facets, rng=np.random.default_rng(3))
    assert support.dtype == bool and support.shape == SHAPE
    extent = _extent(support)
    # oversampling >= 2 in every direction, the longest axis at size * N (within a voxel)
    assert max(extent) <= N // 2
    assert abs(max(extent) - 0.4 * N) <= 1.0
    tol = 0.5 if isinstance(facets, str) else 1.5
    assert np.allclose(_bbox_centre(support), N // 2, atol=tol)


@pytest.mark.parametrize("facets", ["hexagonal", 8, 20])
def test_support_is_convex(facets):
    support = simulate.crystal_support(SHAPE, size=0.45, facets=facets, rng=np.random.default_rng(5))
    pts = np.argwhere(support)
    hull = Delaunay(pts)
    grid = np.argwhere(np.ones(SHAPE, dtype=bool))
    in_hull = (hull.find_simplex(grid, tol=1e-9) >= 0).reshape(SHAPE)
    # every voxel inside the hull of the support is in the support: no dents, no holes
    assert np.array_equal(in_hull, support)


def test_box_is_a_full_cuboid_and_aspect_sets_its_sides():
    support = simulate.crystal_support((40, 40, 40), size=0.5, aspect=(1.0, 0.5, 0.75), facets="box")
    extent = _extent(support)
    assert extent == [21, 11, 15]  # 20 voxels * aspect, +1 for the voxel count of a closed interval
    idx = np.nonzero(support)
    assert support.sum() == np.prod(extent)  # the support fills its bounding box
    assert support[idx[0].min():idx[0].max() + 1, idx[1].min():idx[1].max() + 1, idx[2].min():idx[2].max() + 1].all()


def test_hexagonal_prism_has_constant_hexagonal_sections():
    support = simulate.crystal_support(SHAPE, size=0.45, aspect=(1.0, 1.0, 1.0), facets="hexagonal")
    rows = np.nonzero(support.any(axis=(1, 2)))[0]
    sections = support[rows]
    assert all(np.array_equal(s, sections[0]) for s in sections)  # a prism along axis 0
    section = sections[0]
    # a regular hexagon with flats across axis 1 (R cos 30°) and vertices on axis 2 (radius R)
    e1, e2 = _extent(section)
    assert e2 > e1
    assert abs(e1 / e2 - np.cos(np.pi / 6)) < 0.08
    area = section.sum()
    r = (e2 - 1) / 2
    assert abs(area / (1.5 * np.sqrt(3) * r**2) - 1) < 0.15  # hexagon area, not a square (2r²·...) or circle


def test_rotation_turns_the_crystal():
    rot = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # 90° about axis 0: swaps the sides along 1 and 2
    plain = simulate.crystal_support(SHAPE, size=0.4, aspect=(1.0, 0.5, 0.8), facets="box")
    turned = simulate.crystal_support(SHAPE, size=0.4, aspect=(1.0, 0.5, 0.8), facets="box", rotation=rot)
    assert _extent(plain)[1:] == _extent(turned)[:0:-1]
    with pytest.raises(InputError, match="orthogonal"):
        simulate.crystal_support(SHAPE, rotation=np.ones((3, 3)))


def test_random_facets_follow_the_generator():
    a = simulate.crystal_support(SHAPE, facets=10, rng=np.random.default_rng(1))
    b = simulate.crystal_support(SHAPE, facets=10, rng=np.random.default_rng(1))
    c = simulate.crystal_support(SHAPE, facets=10, rng=np.random.default_rng(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_large_support_is_fast_and_correct():
    support = simulate.crystal_support((128, 128, 128), size=0.35, facets="hexagonal")
    assert max(_extent(support)) == pytest.approx(0.35 * 128, abs=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shape": (32, 32)}, "shape must be 3 integers >= 8"),
    ({"shape": (32, 32, 4)}, "shape must be 3 integers >= 8"),
    ({"shape": (32, 32, 32.5)}, "shape must be 3 integers >= 8"),
    ({"size": 0.6}, r"size must be in \(0, 0.5\]"),
    ({"size": 0.0}, r"size must be in \(0, 0.5\]"),
    ({"facets": "cube"}, "unknown facets 'cube'"),
    ({"facets": 3}, "integer from 4 to 64"),
    ({"aspect": (1.0, -1.0, 1.0)}, "aspect must be 3 positive numbers"),
])
def test_support_rejects_bad_settings(kwargs, message):
    kwargs = {"shape": SHAPE, **kwargs}
    with pytest.raises(InputError, match=message):
        simulate.crystal_support(**kwargs)


# ------------------------------------------------------------------------------------------
# displacement_phase


@pytest.fixture(scope="module")
def support():
    return simulate.crystal_support(SHAPE, size=0.45, facets="hexagonal")


def test_domains_are_smooth_scaled_and_confined(support):
    phase = simulate.displacement_phase(support, kinds=("domains",), amplitude=1.3, rng=np.random.default_rng(0))
    assert phase.dtype == np.float32
    assert np.all(phase[~support] == 0)
    assert np.abs(phase[support]).max() == pytest.approx(1.3, rel=1e-5)
    assert abs(phase[support].mean()) < 1e-5
    inner = ndimage.binary_erosion(support)
    step = np.abs(np.diff(phase, axis=0))[inner[1:] & inner[:-1]]
    assert step.max() < 0.6  # smooth: no jumps between neighbours inside
    assert phase[support].std() > 0.1  # not flat
    other = simulate.displacement_phase(support, kinds=("domains",), amplitude=1.3, rng=np.random.default_rng(1))
    assert not np.allclose(phase, other)


def test_vortex_wraps_two_pi(support):
    phase = simulate.displacement_phase(support, kinds=("vortex",), rng=np.random.default_rng(4))
    values = phase[support]
    assert values.min() >= -np.pi - 1e-6 and values.max() <= np.pi + 1e-6
    assert values.max() - values.min() > 6.0
    both = support[1:] & support[:-1]
    diff = np.diff(phase.astype(np.float64), axis=0)[both]
    assert (np.abs(diff) > 5).any()  # the branch cut: a jump of ~2π
    wrapped = np.angle(np.exp(1j * diff))
    assert np.median(np.abs(wrapped)) < 0.3  # exp(iφ) is smooth away from the core line
    # winding numbers of the voxel plaquettes: ±1 where the line pierces one, 0 everywhere else
    field = np.exp(1j * phase.astype(np.float64))
    corners = [(0, 0), (1, 0), (1, 1), (0, 1)]
    pierced = 0
    for axes in ((0, 1), (1, 2), (0, 2)):
        inside = np.logical_and.reduce([np.roll(support, (-c[0], -c[1]), axis=axes) for c in corners])
        loop = sum(np.angle(np.roll(field, (-c2[0], -c2[1]), axis=axes) / np.roll(field, (-c1[0], -c1[1]), axis=axes))
                   for c1, c2 in zip(corners, corners[1:] + corners[:1]))
        winding = np.round(loop[inside] / (2 * np.pi))
        assert np.allclose(loop[inside], 2 * np.pi * winding, atol=1e-6)
        assert set(np.unique(winding)) <= {-1.0, 0.0, 1.0}
        pierced += int(np.count_nonzero(winding))
    assert 3 <= pierced < 0.02 * support.sum()  # one line of pierced plaquettes through the crystal


def test_shell_grows_towards_the_surface(support):
    phase = simulate.displacement_phase(support, kinds=("shell",), amplitude=0.8)
    depth = ndimage.distance_transform_edt(np.pad(support, 1))[1:-1, 1:-1, 1:-1]
    assert phase[support].max() == pytest.approx(0.8, rel=1e-5)
    assert np.allclose(phase[depth == 1], 0.8)
    means = [phase[(depth >= d) & (depth < d + 1)].mean() for d in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(means, means[1:]))
    assert np.all(phase[~support] == 0)


def test_kinds_add_and_none_is_zero(support):
    zero = simulate.displacement_phase(support, kinds=("none",))
    assert not zero.any()
    shell = simulate.displacement_phase(support, kinds=("shell",))
    both = simulate.displacement_phase(support, kinds=("shell", "none", "shell"))
    assert np.allclose(both, 2 * shell)
    # domains + vortex with one generator = domains, then vortex, from the same stream
    combo = simulate.displacement_phase(support, kinds=("domains", "vortex"), rng=np.random.default_rng(9))
    rng = np.random.default_rng(9)
    first = simulate.displacement_phase(support, kinds=("domains",), rng=rng)
    second = simulate.displacement_phase(support, kinds=("vortex",), rng=rng)
    assert np.allclose(combo, first + second, atol=1e-5)


def test_phase_rejects_bad_input(support):
    with pytest.raises(InputError, match="unknown phase kind.*'ripples'.*domains, vortex, shell, none"):
        simulate.displacement_phase(support, kinds=("ripples",))
    with pytest.raises(InputError, match="non-empty 3D"):
        simulate.displacement_phase(np.zeros(SHAPE, dtype=bool))


# ------------------------------------------------------------------------------------------
# bragg_intensity


def test_noise_free_intensity_follows_the_convention(support):
    phase = simulate.displacement_phase(support, kinds=("domains",), rng=np.random.default_rng(2))
    obj = support * np.exp(1j * phase)
    intensity = simulate.bragg_intensity(obj, photons=None)
    expected = np.abs(_far_field(obj)) ** 2
    assert intensity.dtype == np.float32
    assert intensity.sum() == pytest.approx(1e7, rel=1e-5)
    assert np.allclose(intensity, expected * 1e7 / expected.sum(), rtol=1e-4, atol=1e-3)


def test_flat_phase_peaks_at_the_centre_and_is_centrosymmetric(support):
    intensity = simulate.bragg_intensity(support.astype(np.complex64), photons=None).astype(np.float64)
    assert np.unravel_index(np.argmax(intensity), SHAPE) == (N // 2,) * 3
    # a real object (origin at n//2) has I(q) = I(-q) about the centre
    inner = intensity[1:, 1:, 1:]
    assert np.allclose(inner, inner[::-1, ::-1, ::-1], rtol=1e-4, atol=1e-6 * inner.max())
    # a point at the origin index n//2 gives a flat pattern
    point = np.zeros(SHAPE, dtype=np.complex64)
    point[N // 2, N // 2, N // 2] = 1
    flat = simulate.bragg_intensity(point, photons=None)
    assert np.allclose(flat, 1e7 / N**3, rtol=1e-5)


def test_poisson_noise(support):
    obj = support.astype(np.complex64)
    expected = simulate.bragg_intensity(obj, photons=None).astype(np.float64) * 0.1  # 1e6 photons
    counts = simulate.bragg_intensity(obj, photons=1e6, rng=np.random.default_rng(0)).astype(np.float64)
    assert np.array_equal(counts, np.round(counts))
    assert abs(counts.sum() - 1e6) < 5 * np.sqrt(1e6)
    bright = expected > 20
    chi = (counts[bright] - expected[bright]) ** 2 / expected[bright]
    assert 0.9 < chi.mean() < 1.1  # Poisson: variance = mean
    again = simulate.bragg_intensity(obj, photons=1e6, rng=np.random.default_rng(0))
    assert np.array_equal(counts, again)


def test_intensity_of_a_batch_scales_each_pattern(support):
    objs = np.stack([support, 2.0 * support]).astype(np.complex64)
    intensity = simulate.bragg_intensity(objs, photons=None)
    assert intensity.shape == (2, *SHAPE)
    assert np.allclose(intensity.sum(axis=(1, 2, 3)), 1e7, rtol=1e-5)
    assert np.allclose(intensity[0], intensity[1], rtol=1e-4)


def test_intensity_rejects_bad_input():
    with pytest.raises(InputError, match="at least 3 dimensions"):
        simulate.bragg_intensity(np.ones((8, 8), dtype=np.complex64))
    with pytest.raises(InputError, match="photons must be positive"):
        simulate.bragg_intensity(np.ones(SHAPE, dtype=np.complex64), photons=0)
    with pytest.raises(InputError, match="zero amplitude"):
        simulate.bragg_intensity(np.zeros(SHAPE, dtype=np.complex64))


# ------------------------------------------------------------------------------------------
# simulate_crystal / simulate_series


def test_simulated_crystal_is_consistent_and_seeded():
    crystal = simulate.simulate_crystal(SHAPE, phase_kinds=("domains", "shell"), photons=1e6, seed=3)
    assert crystal.obj.dtype == np.complex64 and crystal.intensity.dtype == np.float32
    assert crystal.phase.dtype == np.float32 and crystal.support.dtype == bool
    assert np.allclose(np.abs(crystal.obj[crystal.support]), 1, atol=1e-6)
    assert not crystal.obj[~crystal.support].any()
    assert np.allclose(np.exp(1j * crystal.phase[crystal.support]), crystal.obj[crystal.support], atol=1e-5)
    assert abs(crystal.intensity.sum() - 1e6) < 5e3
    same = simulate.simulate_crystal(SHAPE, phase_kinds=("domains", "shell"), photons=1e6, seed=3)
    assert np.array_equal(same.intensity, crystal.intensity) and np.array_equal(same.phase, crystal.phase)
    other = simulate.simulate_crystal(SHAPE, phase_kinds=("domains", "shell"), photons=1e6, seed=4)
    assert not np.array_equal(other.phase, crystal.phase)


def test_series_phase_changes_by_coefficient_times_pattern():
    series = simulate.simulate_series(6, SHAPE, photons=1e6, seed=2, size=0.45)
    assert np.allclose(series.coefficients, (0, 0.4, 0.8, 1.0, 0.7, 0.3))
    s0 = series.states[0]
    for a, state in zip(series.coefficients, series.states):
        assert np.array_equal(state.support, s0.support)
        sup = state.support
        assert np.allclose(state.phase[sup] - s0.phase[sup], a * series.pattern[sup], atol=1e-5)
    assert not np.array_equal(series.states[1].intensity, series.states[5].intensity)


def test_series_pattern_is_a_localized_surface_domain():
    series = simulate.simulate_series(3, SHAPE, photons=None, seed=5, size=0.45)
    pattern, sup = series.pattern, series.states[0].support
    assert pattern.dtype == np.float32
    assert not pattern[~sup].any()
    assert pattern.max() == pytest.approx(simulate.PATTERN_AMPLITUDE, rel=1e-5)
    assert 0.01 < (pattern > 0.1 * pattern.max()).sum() / sup.sum() < 0.5  # localized
    depth = ndimage.distance_transform_edt(np.pad(sup, 1))[1:-1, 1:-1, 1:-1]
    assert np.average(depth[sup], weights=pattern[sup]) < 0.8 * depth[sup].mean()  # at the surface
    assert depth[np.unravel_index(np.argmax(pattern), SHAPE)] < 2


def test_series_gives_every_state_its_own_noise():
    series = simulate.simulate_series(3, SHAPE, photons=1e6, seed=1, coefficients=(0, 0.5, 0.5))
    a, b = series.states[1], series.states[2]
    assert np.array_equal(a.obj, b.obj)
    assert not np.array_equal(a.intensity, b.intensity)
    n4 = simulate.simulate_series(4, SHAPE, photons=None, seed=1)
    assert n4.coefficients[0] == 0 and len(n4.states) == 4
    assert np.allclose(n4.coefficients, np.interp(np.linspace(0, 1, 4), np.linspace(0, 1, 6),
                                                  simulate.DEFAULT_COEFFICIENTS))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_states": 1}, "n_states must be an integer >= 2"),
    ({"coefficients": (0, 1)}, "coefficients must be 3 finite numbers"),
    ({"coefficients": (0.2, 1, 2)}, "first coefficient .* must be 0"),
    ({"colour": "red"}, "unknown crystal setting.*colour"),
    ({"phase_kinds": ("waves",)}, "unknown phase kind"),
    ({"shape": (32, 32)}, "shape must be 3 integers"),
])
def test_series_rejects_bad_settings(kwargs, message):
    kwargs = {"n_states": 3, "shape": SHAPE, **kwargs}
    with pytest.raises(InputError, match=message):
        simulate.simulate_series(**kwargs)


# ------------------------------------------------------------------------------------------
# read_pattern: formats


@pytest.fixture
def volume():
    rng = np.random.default_rng(7)
    return rng.poisson(20.0, size=(16, 20, 24)).astype(np.float32)


def test_read_npy(tmp_path, volume):
    np.save(tmp_path / "p.npy", volume)
    pattern = io.read_pattern(str(tmp_path / "p.npy"))
    assert np.array_equal(pattern.intensity, volume) and pattern.intensity.dtype == np.float32
    assert pattern.mask is None
    assert pattern.meta["format"] == "npy" and pattern.meta["scans"] == 1 and pattern.meta["angles"] is None


def test_read_detects_content_not_extension(tmp_path, volume):
    np.save(tmp_path / "p.npy", volume)
    os.rename(tmp_path / "p.npy", tmp_path / "p.bin")
    assert np.array_equal(io.read_pattern(str(tmp_path / "p.bin")).intensity, volume)
    with h5py.File(tmp_path / "q.dat", "w") as h5:
        h5["data"] = volume
    assert np.array_equal(io.read_pattern(str(tmp_path / "q.dat")).intensity, volume)
    (tmp_path / "r.txt").write_text("1 2 3")
    with pytest.raises(InputError, match="neither a .npy array nor an HDF5"):
        io.read_pattern(str(tmp_path / "r.txt"))


def test_read_fsspec_url(volume):
    import fsspec

    with fsspec.open("memory://cdi-test/p.npy", "wb") as f:
        np.save(f, volume)
    pattern = io.read_pattern("memory://cdi-test/p.npy")
    assert np.array_equal(pattern.intensity, volume)
    assert pattern.meta["source"] == ["memory://cdi-test/p.npy"]


def test_read_hdf5_dataset_choice(tmp_path, volume):
    path = str(tmp_path / "d.h5")
    with h5py.File(path, "w") as h5:
        h5["group/frames"] = volume
        h5["group/dark"] = np.zeros((20, 24))
    pattern = io.read_pattern(path)  # the only 3D dataset
    assert np.array_equal(pattern.intensity, volume) and pattern.meta["datasets"] == [f"{path}:group/frames"]
    with h5py.File(path, "a") as h5:
        h5["other"] = volume + 1
    with pytest.raises(InputError, match="several 3D datasets.*group/frames.*other.*dataset="):
        io.read_pattern(path)
    assert np.array_equal(io.read_pattern(path, dataset="other").intensity, volume + 1)
    with pytest.raises(InputError, match="no dataset 'missing'.*group/frames"):
        io.read_pattern(path, dataset="missing")
    with h5py.File(path, "a") as h5:
        h5["data"] = 2 * volume
    assert np.array_equal(io.read_pattern(path).intensity, 2 * volume)  # a root `data` wins


def test_read_cxi_pattern_with_its_mask(tmp_path, volume):
    path = str(tmp_path / "p.cxi")
    det_mask = np.zeros((20, 24), dtype=np.uint32)
    det_mask[5, 7] = 1
    det_mask[:, 12] = 4  # a gap column
    bad = volume.copy()
    bad[:, 5, 7] = np.nan  # a masked pixel may hold anything
    with h5py.File(path, "w") as h5:
        h5["cxi_version"] = 150
        h5["entry_1/data_1/data"] = bad
        h5["entry_1/instrument_1/detector_1/mask"] = det_mask
    pattern = io.read_pattern(path)
    assert pattern.meta["format"] == "cxi"
    assert pattern.mask is not None and pattern.mask.shape == volume.shape
    assert np.array_equal(pattern.mask, np.broadcast_to(det_mask != 0, volume.shape))
    assert np.all(pattern.intensity[pattern.mask] == 0)
    assert np.array_equal(pattern.intensity[~pattern.mask], volume[~pattern.mask])


def test_rocking_scans_are_compressed_and_summed_exactly(tmp_path):
    expected = simulate.simulate_crystal((16, 24, 24), photons=None, seed=0).intensity * 3e-4
    path = io.write_rocking_scans(str(tmp_path / "scans.nxs"), expected, n_scans=4, rng=np.random.default_rng(1))
    with h5py.File(path) as h5:
        assert sorted(h5) == ["entry_1", "entry_2", "entry_3", "entry_4"]
        frames = h5["entry_2/data/data"]
        assert "32008" in frames._filters  # bitshuffle (hdf5plugin)
        assert frames.dtype == np.uint32 and frames.chunks == (1, 24, 24)
        scans = [h5[f"entry_{k}/data/data"][()].astype(np.int64) for k in range(1, 5)]
        angles = h5["entry_1/sample/rocking_angle"][()]
    total = np.sum(scans, axis=0)
    pattern = io.read_pattern(path)
    assert pattern.meta["format"] == "nexus" and pattern.meta["scans"] == 4
    assert np.array_equal(pattern.intensity, total.astype(np.float32))
    assert pattern.intensity.sum() == total.sum()
    assert np.allclose(pattern.meta["angles"], angles) and np.allclose(np.diff(angles), 0.01)
    assert not np.array_equal(scans[0], scans[1])  # each scan has its own noise
    assert abs(total.sum() / expected.sum() - 1) < 0.05


@pytest.mark.parametrize("compression", ["lz4", "gzip", None])
def test_rocking_scan_compressions_read_back(tmp_path, compression):
    expected = np.full((4, 8, 8), 5.0)
    path = io.write_rocking_scans(str(tmp_path / "s.nxs"), expected, n_scans=2, compression=compression,
                                  angles=np.linspace(10, 10.03, 4), rng=np.random.default_rng(0))
    with h5py.File(path) as h5:
        total = h5["entry_1/data/data"][()].astype(np.int64) + h5["entry_2/data/data"][()]
    pattern = io.read_pattern(path)
    assert np.array_equal(pattern.intensity, total)
    assert np.allclose(pattern.meta["angles"], np.linspace(10, 10.03, 4))


def test_repeated_scan_files_are_summed_from_a_list_or_a_glob(tmp_path):
    expected = np.full((8, 10, 12), 3.0)
    for k in range(3):
        io.write_rocking_scans(str(tmp_path / f"run_{k}.nxs"), expected, n_scans=2, rng=np.random.default_rng(k))
    total = np.zeros(expected.shape)
    for k in range(3):
        with h5py.File(tmp_path / f"run_{k}.nxs") as h5:
            total += h5["entry_1/data/data"][()] + h5["entry_2/data/data"][()]
    from_list = io.read_pattern([str(tmp_path / f"run_{k}.nxs") for k in range(3)])
    from_glob = io.read_pattern(str(tmp_path / "run_*.nxs"))
    assert from_list.meta["scans"] == 6 and from_glob.meta["scans"] == 6
    assert np.array_equal(from_list.intensity, total) and np.array_equal(from_glob.intensity, total)
    with pytest.raises(InputError, match="no file matches"):
        io.read_pattern(str(tmp_path / "nothing_*.nxs"))


def test_scans_that_disagree_are_not_summed(tmp_path):
    io.write_rocking_scans(str(tmp_path / "a.nxs"), np.ones((4, 8, 8)), n_scans=1, rng=np.random.default_rng(0))
    io.write_rocking_scans(str(tmp_path / "b.nxs"), np.ones((4, 8, 8)), n_scans=1, angles=np.arange(4) * 0.02,
                           rng=np.random.default_rng(0))
    io.write_rocking_scans(str(tmp_path / "c.nxs"), np.ones((4, 8, 10)), n_scans=1, rng=np.random.default_rng(0))
    with pytest.raises(InputError, match="differ in rocking angles"):
        io.read_pattern([str(tmp_path / "a.nxs"), str(tmp_path / "b.nxs")])
    with pytest.raises(InputError, match=r"differ in shape.*\(4, 8, 8\).*\(4, 8, 10\)"):
        io.read_pattern([str(tmp_path / "a.nxs"), str(tmp_path / "c.nxs")])


def test_nexus_angles_from_the_nxdata_axes_and_detector_fallback(tmp_path, volume):
    path = str(tmp_path / "hand.nxs")
    angles = 12.0 + 0.005 * np.arange(volume.shape[0])
    with h5py.File(path, "w") as h5:
        one = h5.create_group("scan1")
        one.attrs["NX_class"] = "NXentry"
        data = one.create_group("measurement")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "frames"
        data.attrs["axes"] = np.array([b"eta", b".", b"."])
        data["frames"] = volume.astype(np.uint16)
        data["eta"] = angles
        data["frames_pixel_mask"] = np.zeros((20, 24))
        two = h5.create_group("scan2")
        two.attrs["NX_class"] = np.bytes_(b"NXentry")
        two["instrument/detector/data"] = volume.astype(np.uint16)
        pm = np.zeros((20, 24), dtype=np.int32)
        pm[0, 0] = 1
        two["instrument/detector/pixel_mask"] = pm
        two["sample/rocking_angle"] = angles
    pattern = io.read_pattern(path)
    assert pattern.meta["scans"] == 2
    assert np.allclose(pattern.meta["angles"], angles)
    assert pattern.mask is not None and pattern.mask[:, 0, 0].all() and pattern.mask.sum() == volume.shape[0]
    expected = 2 * volume
    expected[:, 0, 0] = 0
    assert np.array_equal(pattern.intensity, expected)


def test_nexus_angles_must_match_the_frames(tmp_path, volume):
    path = str(tmp_path / "bad.nxs")
    with h5py.File(path, "w") as h5:
        h5["entry/data/data"] = volume
        h5["entry"].attrs["NX_class"] = "NXentry"
        h5["entry/sample/rocking_angle"] = np.arange(3.0)
    with pytest.raises(InputError, match="3 rocking angles for 16 frames"):
        io.read_pattern(path)


# ------------------------------------------------------------------------------------------
# read_pattern: processing


def test_roi_binning_and_crop_values(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 50, size=(12, 30, 34)).astype(np.float32)
    data[7, 14, 20] = 5000  # the maximum
    np.save(tmp_path / "p.npy", data)
    url = str(tmp_path / "p.npy")
    roi = io.read_pattern(url, roi=(2, 28, 4, 30))
    assert np.array_equal(roi.intensity, data[:, 2:28, 4:30]) and roi.meta["roi"] == [2, 28, 4, 30]
    binned = io.read_pattern(url, roi=(2, 28, 4, 30), binning=(2, 2, 3))
    manual = data[:, 2:28, 4:30][:, :, :24].reshape(6, 2, 13, 2, 8, 3).sum(axis=(1, 3, 5))
    assert binned.intensity.shape == (6, 14, 8)  # 13 rows padded to an even 14
    assert np.array_equal(binned.intensity[:, :13], manual)
    assert binned.mask is not None and binned.mask[:, 13].all() and not binned.mask[:, :13].any()
    assert binned.meta["pad"] == [0, 1, 0] and binned.meta["binning"] == [2, 2, 3]
    cropped = io.read_pattern(url, crop=8)
    assert cropped.intensity.shape == (8, 8, 8) and cropped.mask is None
    assert cropped.meta["crop"] == {"side": 8, "start": [3, 10, 16]}
    assert np.array_equal(cropped.intensity, data[3:11, 10:18, 16:24])
    assert np.unravel_index(np.argmax(cropped.intensity), (8, 8, 8)) == (4, 4, 4)


def test_crop_is_shifted_inside_and_padded_when_too_large(tmp_path):
    data = np.ones((6, 20, 20), dtype=np.float32)
    data[1, 1, 18] = 100
    np.save(tmp_path / "p.npy", data)
    cropped = io.read_pattern(str(tmp_path / "p.npy"), crop=10)
    assert cropped.meta["crop"]["start"] == [-2, 0, 10]  # rocking padded (6 < 10), rows/cols shifted inside
    assert cropped.intensity.shape == (10, 10, 10)
    assert cropped.mask is not None
    assert cropped.mask[:2].all() and cropped.mask[8:].all() and not cropped.mask[2:8].any()
    assert np.all(cropped.intensity[cropped.mask] == 0)
    assert cropped.intensity[3, 1, 8] == 100


def test_binning_masks_a_bin_if_any_voxel_is_masked(tmp_path):
    data = np.ones((4, 8, 8), dtype=np.float32)
    mask = np.zeros((8, 8), dtype=bool)
    mask[3, 3] = True
    np.save(tmp_path / "m.npy", mask)
    np.save(tmp_path / "p.npy", data)
    binned = io.read_pattern(str(tmp_path / "p.npy"), binning=(1, 2, 2), mask=str(tmp_path / "m.npy"))
    assert binned.mask is not None
    assert binned.mask[:, 1, 1].all() and binned.mask.sum() == 4
    assert np.all(binned.intensity[:, 1, 1] == 3)  # the masked voxel was set to 0 before summing
    assert np.all(binned.intensity[:, 0, 0] == 4)


def test_rocking_angles_follow_binning_and_crop(tmp_path):
    angles = 5 + 0.01 * np.arange(8)
    io.write_rocking_scans(str(tmp_path / "s.nxs"), np.full((8, 8, 8), 2.0), n_scans=1, angles=angles,
                           rng=np.random.default_rng(0))
    binned = io.read_pattern(str(tmp_path / "s.nxs"), binning=(2, 1, 1))
    assert np.allclose(binned.meta["angles"], angles.reshape(4, 2).mean(axis=1))


def test_masks_from_arrays_and_files(tmp_path, volume):
    np.save(tmp_path / "p.npy", volume)
    url = str(tmp_path / "p.npy")
    vmask = np.zeros(volume.shape, dtype=bool)
    vmask[3, 4, 5] = True
    pattern = io.read_pattern(url, mask=vmask)
    assert pattern.mask is not None and pattern.mask.sum() == 1 and pattern.intensity[3, 4, 5] == 0
    with h5py.File(tmp_path / "mask.h5", "w") as h5:
        h5["detector/bad_pixels"] = np.eye(20, 24, dtype=np.uint8)
    from_h5 = io.read_pattern(url, mask=str(tmp_path / "mask.h5"))
    assert from_h5.mask is not None and np.array_equal(from_h5.mask[7], np.eye(20, 24, dtype=bool))
    assert io.read_pattern(url, mask=np.zeros((20, 24))).mask is None  # nothing masked
    with pytest.raises(InputError, match=r"mask has shape \(20, 20\).*frame \(20, 24\).*volume \(16, 20, 24\)"):
        io.read_pattern(url, mask=np.zeros((20, 20), dtype=bool))


def test_values_under_the_mask_are_ignored(tmp_path, volume):
    bad = volume.copy()
    bad[2, 3, 4] = -1
    bad[5, 6, 7] = np.inf
    np.save(tmp_path / "p.npy", bad)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2, 3, 4] = mask[5, 6, 7] = True
    pattern = io.read_pattern(str(tmp_path / "p.npy"), mask=mask)
    assert np.isfinite(pattern.intensity).all() and pattern.intensity.min() >= 0


# ------------------------------------------------------------------------------------------
# read_pattern: errors


def test_read_errors(tmp_path, volume):
    with pytest.raises(InputError, match="no file at .*missing.npy"):
        io.read_pattern(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "frame.npy", volume[0])
    with pytest.raises(InputError, match=r"single 2D frame of shape \(20, 24\).*rocking series"):
        io.read_pattern(str(tmp_path / "frame.npy"))
    np.save(tmp_path / "four.npy", volume[None])
    with pytest.raises(InputError, match=r"shape \(1, 16, 20, 24\): a 3D pattern"):
        io.read_pattern(str(tmp_path / "four.npy"))
    with h5py.File(tmp_path / "frame.h5", "w") as h5:
        h5["image"] = volume[0]
    with pytest.raises(InputError, match=r"no 3D dataset: found image \(20, 24\).*rocking series"):
        io.read_pattern(str(tmp_path / "frame.h5"))
    nan = volume.copy()
    nan[1, 2, 3] = nan[4, 5, 6] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(InputError, match=r"2 NaN/inf intensities \(the first at \(frame, row, col\) = \(1, 2, 3\)"):
        io.read_pattern(str(tmp_path / "nan.npy"))
    neg = volume.copy()
    neg[0, 9, 9] = -3
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(InputError, match=r"1 negative intensities \(the first, -3.0, at .* = \(0, 9, 9\)"):
        io.read_pattern(str(tmp_path / "neg.npy"))
    np.save(tmp_path / "p.npy", volume)
    url = str(tmp_path / "p.npy")
    with pytest.raises(InputError, match=r"roi .* \(0, 30, 0, 10\) is outside the detector frame of 20 rows x 24"):
        io.read_pattern(url, roi=(0, 30, 0, 10))
    with pytest.raises(InputError, match="roi must be 4 integers"):
        io.read_pattern(url, roi=(0, 10))
    with pytest.raises(InputError, match="binning must be 3 integers >= 1"):
        io.read_pattern(url, binning=(1, 0, 1))
    with pytest.raises(InputError, match="crop must be an integer"):
        io.read_pattern(url, crop=1)
    with pytest.raises(InputError, match="no file at .*nomask.npy"):
        io.read_pattern(url, mask=str(tmp_path / "nomask.npy"))
    with h5py.File(tmp_path / "empty.cxi", "w") as h5:
        h5["cxi_version"] = 150
    with pytest.raises(InputError, match="CXI file without entry_1/data_1/data"):
        io.read_pattern(str(tmp_path / "empty.cxi"))
    assert sorted(os.listdir(tmp_path)) == sorted(["frame.npy", "four.npy", "frame.h5", "nan.npy", "neg.npy",
                                                   "p.npy", "empty.cxi"])


# ------------------------------------------------------------------------------------------
# CXI results


def test_cxi_round_trip(tmp_path):
    crystal = simulate.simulate_crystal((16, 16, 16), photons=1e5, seed=1)
    extra = {"strain": np.linspace(0, 1, 16**3).reshape(16, 16, 16), "chi2_starts": np.array([0.3, 0.1])}
    attrs = {"config": {"algorithm": "hio", "iterations": 600}, "source": "data.nxs", "chi2": 0.1}
    url = io.write_cxi(str(tmp_path / "out" / "r.cxi"), crystal.obj, support=crystal.support, chi2=0.125,
                       intensity=crystal.intensity, extra=extra, attrs=attrs)
    assert os.listdir(tmp_path / "out") == ["r.cxi"]  # no temporary left
    with h5py.File(url) as h5:
        assert h5["cxi_version"][()] == 150
        assert h5["entry_1/image_1/data"].dtype == np.complex64
        assert h5["entry_1/image_1/support"].dtype == np.uint8
        assert h5["entry_1/image_1"].attrs["chi2"] == 0.125
        assert h5["entry_1/data_1/data"].dtype == np.float32
    back = io.read_cxi(url)
    assert np.array_equal(back["obj"], crystal.obj) and np.array_equal(back["support"], crystal.support)
    assert back["chi2"] == 0.125
    assert np.array_equal(back["intensity"], crystal.intensity)
    assert np.array_equal(back["strain"], extra["strain"]) and np.array_equal(back["chi2_starts"], [0.3, 0.1])
    assert back["attrs"]["config"] == {"algorithm": "hio", "iterations": 600}
    assert back["attrs"]["source"] == "data.nxs" and back["attrs"]["chi2"] == 0.1
    assert "xrdscale_version" in back["attrs"]
    # the pattern reader takes the intensity of a CXI result
    assert np.array_equal(io.read_pattern(url).intensity, crystal.intensity)


def test_cxi_to_a_fsspec_url():
    obj = np.ones((8, 8, 8), dtype=np.complex64)
    url = io.write_cxi("memory://cdi-test/out.cxi", obj, support=np.ones((8, 8, 8), bool), chi2=0.5)
    back = io.read_cxi(url)
    assert np.array_equal(back["obj"], obj) and back["chi2"] == 0.5 and "intensity" not in back


def test_a_failed_cxi_write_leaves_nothing(tmp_path):
    obj = np.ones((8, 8, 8), dtype=np.complex64)
    with pytest.raises(TypeError):
        io.write_cxi(str(tmp_path / "r.cxi"), obj, support=np.ones((8, 8, 8), bool), chi2=0.5,
                     extra={"bad": np.array([object()])})
    assert os.listdir(tmp_path) == []


def test_cxi_errors(tmp_path):
    obj = np.ones((8, 8, 8), dtype=np.complex64)
    sup = np.ones((8, 8, 8), bool)
    with pytest.raises(InputError, match=r"support has shape \(8, 8\), the object \(8, 8, 8\)"):
        io.write_cxi(str(tmp_path / "r.cxi"), obj, support=sup[0], chi2=0.1)
    with pytest.raises(InputError, match="must be 3D"):
        io.write_cxi(str(tmp_path / "r.cxi"), obj[0], support=sup[0], chi2=0.1)
    with pytest.raises(InputError, match="intensity has shape"):
        io.write_cxi(str(tmp_path / "r.cxi"), obj, support=sup, chi2=0.1, intensity=np.ones((4, 4, 4)))
    with pytest.raises(InputError, match="chi2 must be finite"):
        io.write_cxi(str(tmp_path / "r.cxi"), obj, support=sup, chi2=float("nan"))
    with pytest.raises(InputError, match="'support' is reserved"):
        io.write_cxi(str(tmp_path / "r.cxi"), obj, support=sup, chi2=0.1, extra={"support": sup})
    assert os.listdir(tmp_path) == []
    with h5py.File(tmp_path / "plain.h5", "w") as h5:
        h5["data"] = np.ones((4, 4, 4))
    with pytest.raises(InputError, match="no entry_1/image_1/data"):
        io.read_cxi(str(tmp_path / "plain.h5"))
    with pytest.raises(InputError, match="no file at"):
        io.read_cxi(str(tmp_path / "none.cxi"))


def test_rocking_scan_writer_errors(tmp_path):
    url = str(tmp_path / "s.nxs")
    with pytest.raises(InputError, match="must be 3D"):
        io.write_rocking_scans(url, np.ones((8, 8)))
    with pytest.raises(InputError, match="finite and >= 0"):
        io.write_rocking_scans(url, -np.ones((4, 8, 8)))
    with pytest.raises(InputError, match="2 rocking angles for 4 frames"):
        io.write_rocking_scans(url, np.ones((4, 8, 8)), angles=np.zeros(2))
    with pytest.raises(InputError, match="unknown compression 'zip'"):
        io.write_rocking_scans(url, np.ones((4, 8, 8)), compression="zip")
    with pytest.raises(InputError, match="n_scans must be an integer >= 1"):
        io.write_rocking_scans(url, np.ones((4, 8, 8)), n_scans=0)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# geometry and gridding


def test_q_norm_of_the_paper():
    q = gridding.q_norm(13.5, 28.8)
    assert q == pytest.approx(3.40e10, rel=2e-3)
    assert q == pytest.approx(3.398e10, rel=2e-3)  # the paper's value
    lam = 12.398419843320026 / 13.5 * 1e-10
    assert q == pytest.approx(4 * np.pi * np.sin(np.radians(14.4)) / lam, rel=1e-12)
    with pytest.raises(InputError, match="two_theta_deg must be in"):
        gridding.q_norm(13.5, 190)
    with pytest.raises(InputError, match="energy_kev must be a positive number"):
        gridding.q_norm(-1, 28.8)


def test_voxel_size_of_the_detector_frame():
    size = gridding.voxel_size_nm((40, 32, 64), **GEOMETRY)
    lam = 12.398419843320026 / 13.5 * 1e-10
    q = gridding.q_norm(13.5, 28.8)
    assert size[1] == pytest.approx(lam * 1.0 / (32 * 55e-6) * 1e9, rel=1e-12)
    assert size[2] == pytest.approx(lam * 1.0 / (64 * 55e-6) * 1e9, rel=1e-12)
    assert size[0] == pytest.approx(2 * np.pi / (40 * q * np.radians(0.01)) * 1e9, rel=1e-12)
    assert size[1] == pytest.approx(52.18, abs=0.01)  # 0.9184 Å · 1 m / (32 · 55 µm)
    with pytest.raises(InputError, match="pixel_um must be a positive number"):
        gridding.voxel_size_nm((8, 8, 8), **{**GEOMETRY, "pixel_um": 0})


def test_detector_q_is_the_bragg_vector_at_the_centre():
    qz, qy, qx = gridding.detector_q((8, 10, 12), **GEOMETRY)
    centre = (4, 5, 6)
    assert qz[centre] == pytest.approx(gridding.q_norm(13.5, 28.8) * 1e-10, rel=1e-9)
    assert abs(qy[centre]) < 1e-12 and abs(qx[centre]) < 1e-12
    # one rocking step moves Q by |Q|·Δω perpendicular to it; one column by k·p/D along x
    assert qy[5, 5, 6] - qy[centre] == pytest.approx(qz[centre] * np.radians(0.01), rel=1e-3)
    k = 2 * np.pi / (12.398419843320026 / 13.5)
    assert qx[4, 5, 7] - qx[centre] == pytest.approx(k * 55e-6, rel=1e-3)


def test_orthogonalize_conserves_intensity_and_keeps_the_peak_centred():
    intensity = simulate.simulate_crystal(SHAPE, photons=None, seed=0, phase_kinds=("none",)).intensity
    grid, spacing = gridding.orthogonalize(intensity, **GEOMETRY)
    assert grid.shape == SHAPE and grid.dtype == np.float32
    assert np.isfinite(grid).all()
    assert grid.sum() == pytest.approx(intensity.sum(), rel=0.02)
    peak = np.unravel_index(np.argmax(grid), SHAPE)
    assert all(abs(int(p) - N // 2) <= 1 for p in peak)
    assert all(s > 0 for s in spacing)
    # the grid spans at least the detector data: spacing * N >= extent of the q values
    qs = gridding.detector_q(SHAPE, **GEOMETRY)
    for s, q in zip(spacing, qs):
        q0 = q[N // 2, N // 2, N // 2]
        assert s * (N // 2) >= q0 - q.min() and s * (N - 1 - N // 2) >= q.max() - q0
    small, _ = gridding.orthogonalize(intensity, **GEOMETRY, shape=(16, 20, 24))
    assert small.shape == (16, 20, 24) and small.sum() == pytest.approx(intensity.sum(), rel=0.02)


def test_orthogonalize_maps_a_central_point_to_the_central_bin():
    point = np.zeros((16, 16, 16))
    point[8, 8, 8] = 1.0
    grid, _ = gridding.orthogonalize(point, **GEOMETRY)
    assert grid.sum() == pytest.approx(1.0, rel=1e-6)
    assert np.unravel_index(np.argmax(grid), grid.shape) == (8, 8, 8)


def test_orthogonalize_rejects_bad_input():
    with pytest.raises(InputError, match="must be 3D"):
        gridding.orthogonalize(np.ones((8, 8)), **GEOMETRY)
    with pytest.raises(InputError, match="1 NaN/inf"):
        bad = np.ones((8, 8, 8))
        bad[0, 0, 0] = np.nan
        gridding.orthogonalize(bad, **GEOMETRY)
    with pytest.raises(InputError, match="distance_m must be a positive number"):
        gridding.orthogonalize(np.ones((8, 8, 8)), **{**GEOMETRY, "distance_m": -1.0})
