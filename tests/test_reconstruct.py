"""Reconstruction: equality with bare ASTRA, fidelity against phantoms, store contract, bad input."""

from __future__ import annotations

import astra
import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from _builders import PHANTOM_A as A
from _builders import PHANTOM_N as N
from _builders import phantom_sinograms, write_sinogram
from xrdscale.io import storage
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.recon.geometry import Geometry
from xrdscale.recon.phantoms import default_ellipses, ellipse_image
from xrdscale.stages.reconstruct import reconstruct


def bare_astra(sino2d: np.ndarray, angles_deg: np.ndarray, algorithm: str = "FBP", filter_name: str = "ram-lak",
               iterations: int = 1) -> np.ndarray:
    """The plain ASTRA call, rows flipped to y ascending."""
    n = sino2d.shape[1]
    vg = astra.create_vol_geom(n, n)
    pg = astra.create_proj_geom("parallel", 1.0, n, np.deg2rad(angles_deg))
    pid = astra.create_projector("linear", pg, vg)
    sid = astra.data2d.create("-sino", pg, sino2d.astype(np.float32))
    rid = astra.data2d.create("-vol", vg, 0.0)
    cfg = astra.astra_dict(algorithm)
    cfg.update(ProjectorId=pid, ProjectionDataId=sid, ReconstructionDataId=rid)
    if algorithm == "FBP":
        cfg["FilterType"] = filter_name
    aid = astra.algorithm.create(cfg)
    astra.algorithm.run(aid, iterations)
    out = astra.data2d.get(rid)[::-1].copy()
    astra.algorithm.delete(aid)
    astra.data2d.delete([sid, rid])
    astra.projector.delete(pid)
    return out


def rel_rmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.fixture
def sinogram_url(tmp_path):
    sino, _, angles = phantom_sinograms()
    return write_sinogram(str(tmp_path / "sino.zarr"), sino, angles), sino, angles


@pytest.mark.parametrize("filter_name", ["ram-lak", "hann"])
def test_astra_engine_equals_bare_astra(tmp_path, sinogram_url, filter_name):
    url, sino, angles = sinogram_url
    out = reconstruct(url, str(tmp_path / "vol.zarr"), engine="astra", filter=filter_name)
    vol = storage.open_store(out, stage="volume")["intensity"].values
    for c in range(sino.shape[2]):
        ref = bare_astra(sino[:, :, c], angles, filter_name=filter_name)
        np.testing.assert_allclose(vol[:, :, c], ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("filter_name", ["ram-lak", "shepp-logan", "hann"])
def test_batched_fbp_within_2_percent_of_astra(tmp_path, sinogram_url, filter_name):
    url, sino, angles = sinogram_url
    out = reconstruct(url, str(tmp_path / "vol.zarr"), engine="batched", filter=filter_name)
    vol = storage.open_store(out, stage="volume")["intensity"].values
    for c in range(sino.shape[2]):
        assert rel_rmse(vol[:, :, c], bare_astra(sino[:, :, c], angles, filter_name=filter_name)) < 0.02


def test_batched_sirt_matches_astra_sirt(tmp_path, sinogram_url):
    url, sino, angles = sinogram_url
    out = reconstruct(url, str(tmp_path / "vol.zarr"), engine="batched", algorithm="sirt", iterations=30)
    vol = storage.open_store(out, stage="volume")["intensity"].values
    ref = bare_astra(sino[:, :, 0], angles, algorithm="SIRT", iterations=30)
    assert rel_rmse(vol[:, :, 0], ref) < 0.02


def test_fbp_correlates_with_truth_at_demo_noise(tmp_path):
    sino, truth, angles = phantom_sinograms(64, 90)
    rng = np.random.default_rng(0)
    counts = 2000.0 / sino.max()  # ~2000 counts on the strongest ray
    noisy = rng.poisson(sino * counts) / counts
    url = write_sinogram(str(tmp_path / "sino.zarr"), noisy, angles)
    vol = storage.open_store(reconstruct(url, str(tmp_path / "vol.zarr")), stage="volume")["intensity"].values
    for c in range(sino.shape[2]):
        r = np.corrcoef(vol[:, :, c].ravel(), truth[:, :, c].ravel())[0, 1]
        assert r >= 0.95, (c, r)


def test_sirt_beats_fbp_at_high_noise(tmp_path):
    sino, truth, angles = phantom_sinograms(48, 60, scales=(1.0,))
    rng = np.random.default_rng(1)
    counts = 30.0 / sino.max()
    noisy = rng.poisson(sino * counts) / counts
    url = write_sinogram(str(tmp_path / "sino.zarr"), noisy, angles)
    fbp = storage.open_store(reconstruct(url, str(tmp_path / "fbp.zarr")), stage="volume")["intensity"].values
    sirt = storage.open_store(reconstruct(url, str(tmp_path / "sirt.zarr"), algorithm="sirt", iterations=40),
                              stage="volume")["intensity"].values
    rmse_fbp = np.sqrt(np.mean((fbp - truth) ** 2))
    rmse_sirt = np.sqrt(np.mean((sirt - truth) ** 2))
    assert rmse_sirt < 0.9 * rmse_fbp, (rmse_sirt, rmse_fbp)


def test_volume_store_contract(tmp_path, sinogram_url):
    url, sino, _ = sinogram_url
    out = reconstruct(url, str(tmp_path / "vol.zarr"), channels_per_chunk=2)
    ds = storage.open_store(out, stage="volume")
    assert ds["intensity"].dims == ("y", "x", "q")
    assert ds["intensity"].shape == (N, N, sino.shape[2])
    assert ds["intensity"].encoding["chunks"][2] == sino.shape[2]  # whole pattern per chunk
    np.testing.assert_allclose(ds["x"].values, (np.arange(N) - (N - 1) / 2) * 0.03)
    np.testing.assert_allclose(ds["y"].values, ds["x"].values)
    assert ds.attrs["stage"] == "volume" and '"algorithm": "fbp"' in ds.attrs["config"]
    assert not storage.exists(out + ".channels-tmp")


def test_nan_sinogram_is_refused_and_nothing_complete(tmp_path):
    sino, _, angles = phantom_sinograms()
    sino[3, 5, 1] = np.nan
    url = write_sinogram(str(tmp_path / "sino.zarr"), sino, angles)
    out = str(tmp_path / "vol.zarr")
    with pytest.raises(InputError, match=r"NaN.*1 channel.*q = \[2\.5\]"):
        reconstruct(url, out)
    assert not storage.is_complete(out) if storage.exists(out) else True


def test_angles_not_covering_180_are_refused(tmp_path):
    sino, _, _ = phantom_sinograms()
    url = write_sinogram(str(tmp_path / "sino.zarr"), sino, np.arange(A) * 90.0 / A)
    with pytest.raises(InputError, match="cover 90.0°"):
        reconstruct(url, str(tmp_path / "vol.zarr"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"algorithm": "art"}, "unknown reconstruction algorithm 'art'; expected one of fbp, sirt"),
    ({"filter": "cosine"}, "unknown FBP filter 'cosine'; expected one of ram-lak, shepp-logan, hann"),
    ({"engine": "tomopy"}, "unknown reconstruction engine 'tomopy'; expected one of auto, astra, batched"),
])
def test_unknown_names_list_the_choices(tmp_path, sinogram_url, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        reconstruct(sinogram_url[0], str(tmp_path / "vol.zarr"), **kwargs)


def test_cuda_request_degrades_to_cpu_with_one_info_line(caplog):
    from xrdscale.recon.registry import Impl, get_engine
    from xrdscale.runtime import devices

    if astra.use_cuda():
        pytest.skip("ASTRA sees a CUDA device here: the CPU fallback is not taken (test_cuda_request_takes_the_"
                    "cuda_path covers this machine)")
    devices.clear_cache()  # the line is logged once per process: not before this test
    with caplog.at_level("INFO", logger="xrdscale"):
        engine = get_engine(Impl("astra", "cuda"))
        get_engine(Impl("astra", "cuda"))
    assert engine.device == "cpu"
    lines = [r.getMessage() for r in caplog.records if "CUDA is not usable here" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("reconstruct (astra): ") and "running on the CPU" in lines[0]


@pytest.mark.gpu(library="astra")
def test_cuda_request_takes_the_cuda_path(caplog):
    """Where ASTRA sees a GPU, a CUDA request runs FBP_CUDA, and its volume is the phantom's."""
    from xrdscale.recon.registry import Impl, get_engine
    from xrdscale.runtime import devices

    devices.clear_cache()
    with caplog.at_level("INFO", logger="xrdscale"):
        engine = get_engine(Impl("astra", "cuda"))
    assert engine.device == "cuda"
    assert not any("CUDA is not usable here" in r.getMessage() for r in caplog.records)
    sino, truth, angles = phantom_sinograms()
    vol = engine.fbp(Geometry(tuple(angles), N), sino.astype(np.float32), "ram-lak")
    for c in range(sino.shape[2]):
        # the CPU FBP of this noise-free phantom correlates at 0.985
        r = np.corrcoef(vol[:, :, c].ravel(), truth[:, :, c].ravel())[0, 1]
        assert r >= 0.95, (c, r)
        cpu = bare_astra(sino[:, :, c], angles)
        assert rel_rmse(vol[:, :, c], cpu) < 0.1, c


def test_operator_spilled_to_disk_gives_the_same_result():
    from xrdscale.recon.batched import BatchedEngine, estimate_nnz

    sino, _, angles = phantom_sinograms(32, 40, scales=(1.0, 3.0))
    g = Geometry(tuple(angles), 32)
    in_memory = BatchedEngine("cpu").fbp(g, sino.astype(np.float32), "ram-lak")
    spilled_engine = BatchedEngine("cpu", memory_budget=estimate_nnz(g) // 2)
    spilled = spilled_engine.fbp(g, sino.astype(np.float32), "ram-lak")
    assert spilled_engine.operator(g).spill_dir is not None
    np.testing.assert_allclose(spilled, in_memory, rtol=1e-6, atol=1e-6)


def test_operators_are_built_once_per_process_until_cleared():
    from xrdscale.recon.batched import BatchedEngine, clear_operators

    g = Geometry(tuple(np.linspace(0, 180, 20, endpoint=False)), 16)
    engine = BatchedEngine("cpu")
    first = engine.operator(g)
    assert BatchedEngine("cpu").operator(g) is first
    clear_operators()
    again = engine.operator(g)
    assert again is not first
    assert again.nnz == first.nnz


@pytest.mark.parametrize("spill", [False, True])
def test_operator_in_many_blocks_equals_astra_matrix(spill):
    """Pieces of tile-ordered pixels × angles give W and Wᵀ exactly, in memory and spilled."""
    import torch

    from xrdscale.recon.batched import Operator, _astra_matrix

    g = Geometry(tuple(np.linspace(0.0, 180.0, 30, endpoint=False)), 70)  # tiles of 32 overhang the image
    op = Operator(g, sirt=True, spill=spill, device="cpu", block_nnz=20_000, pixel_block=1000)
    assert len(op.pixel_ranges) == 5 and len(op.forward_blocks) > 5
    assert all(len(pieces) == len(op.forward_blocks) for pieces in op.back_pieces)
    assert sorted(op.order.tolist()) == list(range(70 * 70))
    w = _astra_matrix(g)
    rng = np.random.default_rng(3)
    rays = rng.random((w.shape[0], 3), dtype=np.float32)
    image = rng.random((w.shape[1], 3), dtype=np.float32)
    np.testing.assert_allclose(op.back(torch.from_numpy(rays)).numpy(), (w.T @ rays)[op.order], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(op.forward(torch.from_numpy(image[op.order])).numpy(), w @ image, rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(op.col_sum, np.asarray(w.sum(axis=0)).ravel()[op.order], rtol=1e-5)
    assert op.nnz == w.nnz


def test_cli_reconstruct_and_bad_input_exit_code(tmp_path, sinogram_url):
    from xrdscale.cli import app

    runner = CliRunner()
    out = str(tmp_path / "vol.zarr")
    ok = runner.invoke(app, ["reconstruct", sinogram_url[0], out, "--engine", "batched", "--filter", "hann"])
    assert ok.exit_code == 0, ok.output
    assert storage.is_complete(out)
    bad = runner.invoke(app, ["reconstruct", sinogram_url[0], str(tmp_path / "v2.zarr"), "--algorithm", "art"])
    assert bad.exit_code != 0
    assert not storage.exists(str(tmp_path / "v2.zarr"))


@pytest.mark.s3
def test_reconstruct_s3_round_trip(s3_bucket):
    sino, truth, angles = phantom_sinograms(32, 40, scales=(1.0, 2.0))
    url = write_sinogram(f"{s3_bucket}/sino.zarr", sino, angles)
    out = reconstruct(url, f"{s3_bucket}/vol.zarr")
    assert storage.is_complete(out)
    vol = storage.open_store(out, stage="volume")["intensity"].values
    assert np.corrcoef(vol[:, :, 1].ravel(), truth[:, :, 1].ravel())[0, 1] > 0.95


@pytest.mark.parametrize("filter_name", ["ram-lak", "shepp-logan", "hann"])
def test_toeplitz_filter_equals_fft_filter(monkeypatch, filter_name):
    """The dense-matrix filter (small detectors) and the padded FFT (large ones) agree."""
    import torch

    from xrdscale.recon import filters

    sino = torch.from_numpy(np.random.default_rng(5).random((20, 45, 3), dtype=np.float32))
    by_matrix = filters.filter_sinograms(sino, filter_name)
    monkeypatch.setattr(filters, "TOEPLITZ_MAX_BINS", 0)
    by_fft = filters.filter_sinograms(sino, filter_name)
    assert by_matrix.shape == by_fft.shape == sino.shape
    np.testing.assert_allclose(by_matrix.numpy(), by_fft.numpy(), rtol=1e-4, atol=1e-5 * float(by_fft.abs().max()))


# --- translation grids off the rotation axis ------------------------------------------------------------------


def ellipse_rays(geometry: Geometry, ellipses) -> np.ndarray:
    """Exact ray sums of the ellipses at the geometry's own detector positions (its offset included).

    The formula of :func:`ellipse_sinogram` (Kak & Slaney eq. 3.46) at ``t = geometry.detector_coords()``.
    """
    theta = geometry.angles_rad[:, None]
    t = geometry.detector_coords()[None, :]
    sino = np.zeros((geometry.n_angles, geometry.n_det))
    for x0, y0, a, b, phi, rho in ellipses:
        alpha2 = (a * np.cos(theta - np.deg2rad(phi))) ** 2 + (b * np.sin(theta - np.deg2rad(phi))) ** 2
        s = x0 * np.cos(theta) + y0 * np.sin(theta)
        sino += 2.0 * rho * a * b * np.sqrt(np.clip(alpha2 - (t - s) ** 2, 0.0, None)) / alpha2
    return sino


SK_SCALES = (1.0, 2.0, 0.5)


def skimage_sinograms(n: int = 64, a: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """``skimage.transform.radon`` of a Shepp-Logan phantom, channels = scaled copies; (sino, theta_deg).

    scikit-image puts the rotation axis on bin ``n // 2``: for even ``n`` the grid is half a step off centre.
    """
    from skimage.data import shepp_logan_phantom
    from skimage.transform import radon, resize

    image = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)
    rows, cols = np.mgrid[:n, :n]
    image[(rows - n // 2) ** 2 + (cols - n // 2) ** 2 > (n // 2 - 1) ** 2] = 0.0  # radon(circle=True) wants it
    theta = np.arange(a) * 180.0 / a
    sino = radon(image, theta, circle=True).T  # (angle, bin)
    return np.stack([s * sino for s in SK_SCALES], axis=-1), theta


def iradon_on_our_grid(sino2d: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``skimage.transform.iradon`` (ramp) sampled at our pixel centres, and the mask of its disc.

    scikit-image's pixel (row, col) lies at ``x = col − n//2``, ``y = n//2 − row``, and its ``radon`` at angle θ
    integrates along ``x cos θ + y sin θ = bin − n//2``: our convention with the same angles, rows running the
    other way. For even ``n`` its pixel centres are half a pixel off ours (x and y centred on the axis), so the
    reference is resampled (cubic) at our ``(x, y)``.
    """
    from scipy import ndimage
    from skimage.transform import iradon

    ref = iradon(sino2d.T, theta, filter_name="ramp", circle=True)
    n = ref.shape[0]
    c = np.arange(n) - (n - 1) / 2.0
    y, x = np.meshgrid(c, c, indexing="ij")
    on_ours = ndimage.map_coordinates(ref, [n // 2 - y, n // 2 + x], order=3)
    return on_ours, x ** 2 + y ** 2 <= (n / 2.0 - 2.0) ** 2


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def engines():
    from xrdscale.recon.astra_engine import AstraEngine
    from xrdscale.recon.batched import BatchedEngine

    return {"astra": AstraEngine("cpu"), "batched": BatchedEngine("cpu")}


def test_geometry_from_coords_keeps_the_offset_of_the_grid(caplog):
    from xrdscale.recon.geometry import geometry_from_coords

    angles = np.arange(A) * 180.0 / A
    with caplog.at_level("INFO", logger="xrdscale.recon.geometry"):
        even = geometry_from_coords(angles, (np.arange(64) - 32) * 0.03)  # scikit-image's grid
        centred = geometry_from_coords(angles, (np.arange(64) - 31.5 + 1e-6) * 0.03)
        odd = geometry_from_coords(angles, (np.arange(49) - 24 + 1.37) * 0.03)
    assert even.offset == pytest.approx(-0.5) and even.n_det == 64 and even.step_mm == pytest.approx(0.03)
    assert centred.offset == 0.0  # rounding, not an offset
    assert odd.offset == pytest.approx(1.37)
    np.testing.assert_allclose(odd.translation_coords(), (np.arange(49) - 24 + 1.37) * 0.03)
    np.testing.assert_allclose(odd.pixel_coords(), (np.arange(49) - 24) * 0.03)  # volume centred on the axis
    assert odd.subset(np.arange(5)).offset == odd.offset
    logged = [r.getMessage() for r in caplog.records if "off the rotation axis" in r.getMessage()]
    assert len(logged) == 2 and "-0.5 steps" in logged[0] and "1.37 steps" in logged[1]


@pytest.mark.parametrize(("translation", "match"), [
    ((np.arange(40) + 4.0) * 0.03, r"centred 23\.50 steps .* off the rotation axis, more than 0\.25 of its width"),
    ((np.arange(40) - 30.0) * 0.03, r"centred -10\.50 steps"),
    (np.r_[np.arange(20), np.arange(21, 41)] * 0.03 - 0.6, "evenly spaced"),
    (np.arange(40)[::-1] * 0.03 - 0.6, "ascending and evenly spaced"),
])
def test_geometry_from_coords_still_refuses_bad_grids(translation, match):
    from xrdscale.recon.geometry import geometry_from_coords

    with pytest.raises(InputError, match=match):
        geometry_from_coords(np.arange(A) * 180.0 / A, translation)


def test_geometry_from_coords_still_refuses_bad_angles():
    from xrdscale.recon.geometry import geometry_from_coords

    with pytest.raises(InputError, match="strictly ascending"):
        geometry_from_coords(np.arange(A)[::-1] * 180.0 / A, (np.arange(40) - 20) * 0.03)


def test_engines_reconstruct_skimage_radon_on_even_grid():
    """Engines on numpy arrays (independent of the store layer): iradon's image, the half-step offset honoured."""
    from xrdscale.recon.geometry import geometry_from_coords

    sino, theta = skimage_sinograms()
    n = sino.shape[1]
    g = geometry_from_coords(theta, (np.arange(n) - n // 2) * 0.03)
    assert g.offset == pytest.approx(-0.5)
    unshifted = Geometry(g.angles_deg, g.n_det, g.step_mm)  # the same data read as if centred
    for name, engine in engines().items():
        vol = engine.fbp(g, sino.astype(np.float32), "ram-lak")
        wrong = engine.fbp(unshifted, sino.astype(np.float32), "ram-lak")
        for c in range(sino.shape[2]):
            ref, disc = iradon_on_our_grid(sino[:, :, c], theta)
            r = pearson(vol[:, :, c][disc], ref[disc])
            assert r >= 0.98, (name, c, r)
            assert pearson(wrong[:, :, c][disc], ref[disc]) < r - 0.03, name
            np.testing.assert_allclose(np.abs(vol[:, :, c][disc]).max(), np.abs(ref[disc]).max(), rtol=0.15)


def test_centred_odd_grid_matches_skimage_without_resampling():
    """The orientation mapping on the centred case (odd n: scikit-image's grid is ours)."""
    sino, theta = skimage_sinograms(63, 90)
    g = Geometry(tuple(theta), 63)
    from skimage.transform import iradon

    for name, engine in engines().items():
        vol = engine.fbp(g, sino[:, :, :1].astype(np.float32), "ram-lak")[:, :, 0]
        ref = iradon(sino[:, :, 0].T, theta, filter_name="ramp", circle=True)[::-1]
        _, disc = iradon_on_our_grid(sino[:, :, 0], theta)
        assert pearson(vol[disc], ref[disc]) >= 0.99, name


@pytest.mark.parametrize("engine", ["astra", "batched"])
def test_skimage_even_grid_store_reconstructs_like_iradon(tmp_path, engine, caplog):
    """A plain-xarray sinogram on scikit-image's grid (axis on bin n//2) through the reconstruct stage."""
    sino, theta = skimage_sinograms()
    n, step = sino.shape[1], 0.03
    url = str(tmp_path / "sino.zarr")
    xr.Dataset({"intensity": (("angle", "translation", "q"), sino.astype(np.float32))},
               coords={"angle": theta, "translation": (np.arange(n) - n // 2) * step,
                       "q": [1.5, 2.0, 2.5]}).to_zarr(url)
    with caplog.at_level("INFO", logger="xrdscale"):
        out = reconstruct(url, str(tmp_path / "vol.zarr"), algorithm="fbp", filter="ram-lak", engine=engine)
    assert sum("off the rotation axis" in r.getMessage() for r in caplog.records) == 1
    ds = storage.open_store(out, stage="volume")
    np.testing.assert_allclose(ds["x"].values, (np.arange(n) - (n - 1) / 2) * step)  # centred on the axis
    np.testing.assert_allclose(ds["y"].values, ds["x"].values)
    vol = ds["intensity"].values
    for c in range(sino.shape[2]):
        ref, disc = iradon_on_our_grid(sino[:, :, c], theta)
        r = pearson(vol[:, :, c][disc], ref[disc])
        assert r >= 0.98, (engine, c, r)


def _offset_case(offset: float, n: int = 49, a: int = A):
    from xrdscale.recon.geometry import geometry_from_coords

    angles = np.arange(a) * 180.0 / a
    g = geometry_from_coords(angles, (np.arange(n) - (n - 1) / 2 + offset) * 0.03)
    ellipses = default_ellipses(n)
    sino = np.stack([s * ellipse_rays(g, ellipses) for s in (1.0, 3.0)], axis=-1).astype(np.float32)
    truth = np.stack([s * ellipse_image(n, ellipses) for s in (1.0, 3.0)], axis=-1)
    c = np.arange(n) - (n - 1) / 2
    y, x = np.meshgrid(c, c, indexing="ij")
    disc = x ** 2 + y ** 2 <= ((n - 1) / 2 - 4.5) ** 2  # seen from every angle in both cases
    return g, sino, truth, disc


def _fidelity(vol: np.ndarray, truth: np.ndarray, disc: np.ndarray) -> tuple[float, float]:
    r = min(pearson(vol[:, :, c][disc], truth[:, :, c][disc]) for c in range(truth.shape[2]))
    err = max(rel_rmse(vol[:, :, c][disc], truth[:, :, c][disc]) for c in range(truth.shape[2]))
    return r, err


@pytest.mark.parametrize("algorithm", ["fbp", "sirt"])
@pytest.mark.parametrize("engine", ["astra", "batched"])
def test_odd_grid_off_by_a_fraction_of_a_step_matches_truth_as_the_centred_grid(engine, algorithm):
    eng = engines()[engine]

    def run(g, sino):
        return eng.fbp(g, sino, "ram-lak") if algorithm == "fbp" else eng.sirt(g, sino, 40)

    g0, sino0, truth, disc = _offset_case(0.0)
    g1, sino1, _, _ = _offset_case(1.37)
    assert g0.offset == 0.0 and g1.offset == pytest.approx(1.37)
    r0, e0 = _fidelity(run(g0, sino0), truth, disc)
    r1, e1 = _fidelity(run(g1, sino1), truth, disc)
    assert r1 >= r0 - 0.01 and e1 <= 1.1 * e0, (r0, r1, e0, e1)
    _, e_wrong = _fidelity(run(Geometry(g1.angles_deg, g1.n_det, g1.step_mm), sino1), truth, disc)
    assert e_wrong > 1.5 * e0, (e0, e_wrong)  # the offset matters: ignoring it is far worse


@pytest.mark.parametrize("algorithm", ["fbp", "sirt"])
def test_engines_agree_on_an_offset_grid(algorithm):
    """Same operator from the same geometry: ASTRA (BP of the filtered sinogram on the CPU) and batched agree."""
    g, sino, _, _ = _offset_case(-2.5, n=40)
    eng = engines()
    if algorithm == "fbp":
        a, b = (e.fbp(g, sino, "shepp-logan") for e in eng.values())
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())
    else:
        a, b = (e.sirt(g, sino, 20) for e in eng.values())
        assert rel_rmse(b, a) < 0.02


def test_offset_store_sirt_reconstructs(tmp_path):
    g, sino, truth, disc = _offset_case(1.37)
    url = str(tmp_path / "sino.zarr")
    xr.Dataset({"intensity": (("angle", "translation", "q"), sino)},
               coords={"angle": np.asarray(g.angles_deg), "translation": g.translation_coords(),
                       "q": [1.5, 2.0]}).to_zarr(url)
    for engine in ("astra", "batched"):
        out = reconstruct(url, str(tmp_path / f"{engine}.zarr"), algorithm="sirt", iterations=40, engine=engine)
        vol = storage.open_store(out, stage="volume")["intensity"].values
        r, _ = _fidelity(vol, truth, disc)
        assert r >= 0.95, (engine, r)


def test_operator_of_an_offset_grid_is_the_shifted_detector_and_cached_apart():
    from xrdscale.recon.astra_engine import astra_geometry
    from xrdscale.recon.batched import BatchedEngine, _astra_matrix

    angles = tuple(np.linspace(0.0, 180.0, 24, endpoint=False))
    g0, g1, gh = Geometry(angles, 20), Geometry(angles, 20, offset=1.0), Geometry(angles, 20, offset=-0.5)
    w0 = _astra_matrix(g0).toarray().reshape(24, 20, -1)
    w1 = _astra_matrix(g1).toarray().reshape(24, 20, -1)
    np.testing.assert_allclose(w1[:, :-1], w0[:, 1:], atol=1e-5)  # one bin over: bin i sees centred bin i+1
    assert astra_geometry(gh)[1]["type"] == "parallel_vec" and astra_geometry(g0)[1]["type"] == "parallel"
    engine = BatchedEngine("cpu")
    op0, oph = engine.operator(g0), engine.operator(gh)
    assert oph is not op0 and engine.operator(gh) is oph
    assert abs(oph.nnz - op0.nnz) < 0.1 * op0.nnz


def test_transmission_on_an_offset_grid_follows_the_shifted_rays():
    from xrdscale.stages.absorption import transmission

    n, mu0, step = 40, 0.5, 0.03  # μ in 1/mm
    angles = tuple(np.arange(A) * 180.0 / A)
    ellipses = default_ellipses(n)
    mu = mu0 * ellipse_image(n, ellipses)
    for offset in (0.0, -0.5, 2.3):
        g = Geometry(angles, n, step, offset)
        exact = ellipse_rays(g, [(*e[:5], e[5] * mu0 * step) for e in ellipses])
        got = -np.log(transmission(mu, g))
        assert rel_rmse(got, exact) < 0.03, offset
        if offset:
            centred = -np.log(transmission(mu, Geometry(angles, n, step)))
            assert rel_rmse(centred, exact) > 2 * rel_rmse(got, exact), offset


def test_operator_memory_is_capped_by_dask_config_so_workers_do_not_grow_with_the_scan():
    """The operator is held in memory up to ``xrdscale.reconstruct.operator-memory`` (1 GiB by
    default): the paper's 637 px × 400 angles spill, a quarter-size scan does not."""
    import dask

    from xrdscale.recon.batched import OPERATOR_MEMORY, OPERATOR_MEMORY_KEY, default_budget, operator_bytes
    from xrdscale.recon.geometry import Geometry

    assert default_budget() <= OPERATOR_MEMORY
    paper = Geometry(tuple(np.linspace(0.0, 180.0, 400, endpoint=False)), 637)
    quarter = Geometry(tuple(np.linspace(0.0, 180.0, 200, endpoint=False)), 319)
    assert operator_bytes(paper) > OPERATOR_MEMORY > operator_bytes(quarter)
    with dask.config.set({OPERATOR_MEMORY_KEY: "64 MiB"}):
        assert default_budget() == 64 * 2**20
    with dask.config.set({OPERATOR_MEMORY_KEY: 10**15}):
        assert default_budget() < 10**15   # never above a quarter of the free memory
