"""Noise2Inverse: better PSNR than plain FBP against the phantom's truth; bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from _builders import phantom_sinograms, write_sinogram
from xrdscale.io import storage
from xrdscale.stages.denoise import N2IConfig, denoise
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.stages.reconstruct import reconstruct


def psnr(img: np.ndarray, truth: np.ndarray) -> float:
    data_range = truth.max() - truth.min()
    return float(20 * np.log10(data_range / np.sqrt(np.mean((img - truth) ** 2))))


@pytest.fixture
def noisy(tmp_path):
    sino, truth, angles = phantom_sinograms(48, 96, scales=(1.0, 1.5, 0.7, 1.2))
    rng = np.random.default_rng(3)
    counts = 150.0 / sino.max()
    url = write_sinogram(str(tmp_path / "sino.zarr"), rng.poisson(sino * counts) / counts, angles)
    vol = reconstruct(url, str(tmp_path / "fbp.zarr"))
    return url, vol, truth


def test_noise2inverse_improves_psnr_over_fbp(tmp_path, noisy):
    url, vol_url, truth = noisy
    cfg = N2IConfig(splits=4, realizations=3, pretrain_channels=4, pretrain_epochs=30, finetune_epochs=2,
                    batch_size=8, features=8)
    out = denoise(url, vol_url, str(tmp_path / "n2i.zarr"), config=cfg, channels_per_chunk=2)
    fbp = storage.open_store(vol_url, stage="volume")["intensity"].values
    ds = storage.open_store(out, stage="volume")
    den = ds["intensity"].values
    assert '"method": "noise2inverse"' in ds.attrs["config"]
    for c in range(truth.shape[2]):
        gain = psnr(den[:, :, c], truth[:, :, c]) - psnr(fbp[:, :, c], truth[:, :, c])
        assert gain > 2.0, (c, gain)  # dB


def test_split_reconstructions_average_to_the_full_fbp(noisy):
    from xrdscale.stages.denoise import split_pairs
    from xrdscale.recon.registry import Impl, get_engine
    from xrdscale.stages.reconstruct import open_sinogram

    url, vol_url, _ = noisy
    intensity, geometry = open_sinogram(url)
    sino = intensity.values.astype(np.float32)
    inputs, targets, full = split_pairs(sino, geometry, get_engine(Impl("batched")), "ram-lak", 4,
                                        np.random.default_rng(0))
    # each target uses 1/4 of the angles: the mean of the 4 targets is the full FBP (linearity)
    np.testing.assert_allclose(targets.mean(axis=0), full, atol=1e-4 * np.abs(full).max())
    ref = storage.open_store(vol_url, stage="volume")["intensity"].values.transpose(2, 0, 1)
    np.testing.assert_allclose(full, ref, atol=1e-4 * np.abs(ref).max())


def test_bad_settings_and_mismatched_volume(tmp_path, noisy):
    url, vol_url, _ = noisy
    with pytest.raises(ConfigError, match=r"(?s)splits: Input should be greater than or equal to 2.*lr: Input should "
                                          r"be greater than 0"):
        denoise(url, vol_url, str(tmp_path / "o.zarr"), splits=1, lr=0)
    sino, _, angles = phantom_sinograms(32, 40, scales=(1.0,))
    other = write_sinogram(str(tmp_path / "other.zarr"), sino, angles)
    with pytest.raises(InputError, match="give the matching pair"):
        denoise(other, vol_url, str(tmp_path / "o.zarr"))
    assert not storage.exists(str(tmp_path / "o.zarr"))


def test_cli_denoise(tmp_path, noisy):
    from typer.testing import CliRunner

    from xrdscale.cli import app

    url, vol_url, _ = noisy
    out = str(tmp_path / "n2i.zarr")
    res = CliRunner().invoke(app, ["denoise", url, vol_url, out, "--pretrain-epochs", "1", "--finetune-epochs", "0",
                                   "--realizations", "1", "--features", "4"])
    assert res.exit_code == 0, res.output
    assert storage.is_complete(out)
    bad = CliRunner().invoke(app, ["denoise", url, vol_url, str(tmp_path / "bad.zarr"), "--splits", "1"])
    assert bad.exit_code != 0 and not storage.exists(str(tmp_path / "bad.zarr"))
    assert CliRunner().invoke(app, ["denoise", "--help"]).exit_code == 0
