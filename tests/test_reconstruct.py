"""Reconstruction: equality with bare ASTRA, fidelity against phantoms, store contract, bad input."""

from __future__ import annotations

import astra
import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from xrdscale.io import storage
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.recon.geometry import Geometry
from xrdscale.recon.phantoms import default_ellipses, ellipse_image, ellipse_sinogram
from xrdscale.stages.reconstruct import reconstruct

N, A = 48, 72


def write_sinogram(url: str, sino: np.ndarray, angles_deg: np.ndarray, step_mm: float = 0.03) -> str:
    """A ``sinogram`` store following the contract (as the sinogram stage writes it)."""
    n = sino.shape[1]
    ds = xr.Dataset(
        {"intensity": (("angle", "translation", "q"), sino.astype(np.float32))},
        coords={"angle": angles_deg, "translation": (np.arange(n) - (n - 1) / 2) * step_mm,
                "q": np.linspace(1.2, 3.8, sino.shape[2])},
    ).chunk({"angle": -1, "translation": -1, "q": 2})
    return storage.write_store(ds, url, stage="sinogram", config={"test": True})


def phantom_sinograms(n: int = N, a: int = A, scales=(1.0, 2.0, 0.5)):
    """Channels = the ellipse phantom times a per-channel scale; returns (sino, truth, angles)."""
    angles = np.arange(a) * 180.0 / a
    g = Geometry(tuple(angles), n)
    ellipses = default_ellipses(n)
    base = ellipse_sinogram(g, ellipses)
    sino = np.stack([s * base for s in scales], axis=-1)
    truth = np.stack([s * ellipse_image(n, ellipses) for s in scales], axis=-1)
    return sino, truth, angles


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
    ({"engine": "tomopy"}, "unknown reconstruction engine 'tomopy'; available engines: auto, astra, batched"),
])
def test_unknown_names_list_the_choices(tmp_path, sinogram_url, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        reconstruct(sinogram_url[0], str(tmp_path / "vol.zarr"), **kwargs)


def test_cuda_request_degrades_to_cpu_with_one_info_line(caplog):
    from xrdscale.recon.registry import Impl, get_engine

    with caplog.at_level("INFO", logger="xrdscale"):
        engine = get_engine(Impl("astra", "cuda"))
    if not astra.use_cuda():
        assert engine.device == "cpu"
        assert sum("CUDA requested but not available" in r.message for r in caplog.records) == 1


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
