"""Bragg CDI phase retrieval: the Fourier convention and χ², projections, batched starts, recovery, post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrdscale.cdi import fourier, phasing, post
from xrdscale.cdi.simulate import simulate_crystal
from xrdscale.exceptions import InputError
from xrdscale.stages.cdi import CdiConfig

Q_NORM = 2.0e10  # |Q| in 1/m (about a 0.3 nm lattice spacing)


def crystal(n: int = 32, *, seed: int = 0, photons: float | None = 1e6, amplitude: float = 1.5):
    return simulate_crystal((n, n, n), size=0.35, phase_amplitude=amplitude, photons=photons, seed=seed)


def scaled(c) -> np.ndarray:
    """The true object scaled to the intensity's photon total (χ² compares absolute moduli)."""
    return c.obj * np.sqrt(c.intensity.sum() / np.sum(np.abs(c.obj) ** 2))


def grid(n: int) -> list[np.ndarray]:
    return list(np.meshgrid(*[np.arange(n) - n // 2] * 3, indexing="ij"))


def box(n: int = 32, half: tuple[int, int, int] = (4, 5, 6)) -> np.ndarray:
    s = np.zeros((n, n, n), bool)
    c = n // 2
    s[c - half[0]:c + half[0], c - half[1]:c + half[1], c - half[2]:c + half[2]] = True
    return s


# --- the Fourier convention and χ² ------------------------------------------------------------------------


def test_forward_backward_convention(rng):
    x = (rng.normal(size=(2, 16, 16, 16)) + 1j * rng.normal(size=(2, 16, 16, 16))).astype(np.complex64)
    f = fourier.forward(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(f, fourier.forward_np(x), atol=1e-4)
    np.testing.assert_allclose(fourier.backward(torch.from_numpy(f)).numpy(), x, atol=1e-4)
    np.testing.assert_allclose(np.sum(np.abs(f) ** 2), np.sum(np.abs(x) ** 2), rtol=1e-4)  # ortho: Parseval
    # a real, positive object: the Bragg peak at the array centre; a point at the origin n//2: a flat far field
    peak = fourier.forward_np(box(16).astype(np.float32))
    assert np.unravel_index(np.argmax(np.abs(peak)), peak.shape) == (8, 8, 8)
    point = np.zeros((15, 16, 17), np.complex64)
    point[7, 8, 8] = 1
    np.testing.assert_allclose(fourier.forward_np(point), 1 / np.sqrt(15 * 16 * 17), atol=1e-6)


def test_chi2_is_zero_for_the_true_object_and_blind_to_its_ambiguities():
    c = crystal(32, photons=None)
    obj = scaled(c)
    assert fourier.chi2(c.intensity, obj) < 1e-8
    ambiguous = {
        "global phase": obj * np.exp(1.3j),
        "shift": np.roll(obj, (3, -2, 5), axis=(0, 1, 2)),
        "twin": fourier.twin(obj),
        "twin (plain flip)": np.conj(obj[::-1, ::-1, ::-1]),
    }
    for name, other in ambiguous.items():
        assert fourier.chi2(c.intensity, other) < 1e-8, name
    # ... and not blind to a wrong phase: the test can fail
    wrong = np.abs(obj) * np.exp(1j * (c.phase + 0.5 * np.sign(grid(32)[2])))
    assert fourier.chi2(c.intensity, wrong) > 1e-2
    # on noisy data, the ambiguities leave χ² exactly as it is
    noisy = crystal(32, photons=1e6)
    base = fourier.chi2(noisy.intensity, scaled(noisy))
    assert 1e-3 < base < 0.1
    for other in (scaled(noisy) * 1j, fourier.twin(scaled(noisy)), np.roll(scaled(noisy), 4, axis=1)):
        assert fourier.chi2(noisy.intensity, other) == pytest.approx(base, rel=1e-5)


def test_twin_is_the_point_reflection_through_the_centre():
    for n in (8, 9):
        x = np.zeros((n, n, n), np.complex64)
        x[n // 2 + 1, n // 2 - 2, n // 2 + 3] = 1j
        t = fourier.twin(x)
        assert t[n // 2 - 1, n // 2 + 2, n // 2 - 3] == -1j
        assert np.count_nonzero(t) == 1


def test_chi2_batched_masked_and_from_the_modulus():
    c = crystal(32, photons=None)
    obj = scaled(c)
    bad = obj * np.exp(0.8j * (grid(32)[0] > 0))
    values = fourier.chi2(c.intensity, np.stack([obj, bad, obj * 2]))
    assert values.shape == (3,)
    assert values[0] < 1e-8 and values[1] > 1e-3
    # |F| = 2|F_true|: Σ(|F_t| − 2|F_t|)² / Σ 4|F_t|² = 1/4
    assert values[2] == pytest.approx(0.25, rel=1e-5)
    modulus = np.abs(fourier.forward_np(bad))
    assert fourier.chi2(c.intensity, modulus) == pytest.approx(values[1], rel=1e-5)
    # a voxel left out by the mask does not count, however wrong it is
    intensity = c.intensity.copy()
    intensity[3, 4, 5] = 1e9
    mask = np.zeros(intensity.shape, bool)
    mask[3, 4, 5] = True
    assert fourier.chi2(intensity, obj) > 1
    assert fourier.chi2(intensity, obj, mask) < 1e-8
    assert isinstance(fourier.chi2(torch.from_numpy(c.intensity), torch.from_numpy(np.stack([obj, obj]))),
                      torch.Tensor)
    with pytest.raises(InputError, match=r"\(16, 16, 16\) does not match the intensity's \(32, 32, 32\)"):
        fourier.chi2(c.intensity, obj[:16, :16, :16])
    with pytest.raises(InputError, match="mask's shape"):
        fourier.chi2(c.intensity, obj, mask[:4])


def test_fourier_shift_moves_by_any_amount(rng):
    x = rng.normal(size=(16, 16, 16))
    np.testing.assert_allclose(fourier.fourier_shift(x, (2, -3, 1)).real, np.roll(x, (2, -3, 1), (0, 1, 2)), atol=1e-5)
    smooth = np.exp(-sum(g.astype(float) ** 2 for g in grid(16)) / 8)
    moved = fourier.fourier_shift(smooth, (0.5, 0.25, -1.5)).real
    com = post.centre_of_mass(moved)
    np.testing.assert_allclose(com, [8.5, 8.25, 6.5], atol=0.01)


# --- projections ---------------------------------------------------------------------------------------------


def test_modulus_projection_honours_mask_and_zero_photons(rng):
    f = torch.from_numpy((rng.normal(size=(2, 8, 8, 8)) + 1j * rng.normal(size=(2, 8, 8, 8))).astype(np.complex64))
    amp = torch.from_numpy(rng.uniform(1, 2, size=(8, 8, 8)).astype(np.float32))
    amp[0, 0, :4] = 0  # measured zeros
    measured = torch.ones((8, 8, 8), dtype=torch.bool)
    measured[1, :, :] = False  # a detector gap
    out = phasing.project_modulus(f, amp, measured)
    inside = measured.expand_as(out)
    np.testing.assert_allclose(out.abs()[inside].numpy(), amp.expand_as(out)[inside].numpy(), rtol=1e-5)
    np.testing.assert_allclose(torch.angle(out)[inside & (amp > 0)].numpy(), torch.angle(f)[inside & (amp > 0)].numpy(),
                               atol=1e-5)
    assert torch.all(out[:, 0, 0, :4] == 0)  # zero photons: |F| -> 0
    assert torch.equal(out[:, 1], f[:, 1])  # masked: the model's value
    assert not torch.equal(out, f)
    # the same without a mask: the gap is constrained too
    full = phasing.project_modulus(f, amp, None)
    np.testing.assert_allclose(full.abs()[:, 1].numpy(), amp[1].expand(2, 8, 8).numpy(), rtol=1e-5)


def test_support_projection_and_updates():
    x = torch.tensor([1 + 1j, -2 + 0.5j, 3 - 1j, -1 - 1j], dtype=torch.complex64)
    y = torch.tensor([2 + 0j, -1 + 1j, 1 + 1j, -3 + 0j], dtype=torch.complex64)
    s = torch.tensor([True, True, False, False])
    assert torch.equal(phasing.project_support(y, s), torch.tensor([2, -1 + 1j, 0, 0], dtype=torch.complex64))
    assert torch.equal(phasing.project_support(y, s, positivity=True), torch.tensor([2, 1j, 0, 0],
                                                                                   dtype=torch.complex64))
    beta = 0.5
    torch.testing.assert_close(phasing.update(x, y, s, "er", beta), y * s)
    torch.testing.assert_close(phasing.update(x, y, s, "hio", beta), torch.where(s, y, x - beta * y))
    torch.testing.assert_close(phasing.update(x, y, s, "raar", beta), torch.where(s, y, beta * x + (1 - 2 * beta) * y))
    # RAAR's general form (with reflections) and the simplified one agree; positivity: HIO feedback on Re < 0
    general = beta * (phasing.project_support(2 * y - x, s) + x) + (1 - 2 * beta) * y
    torch.testing.assert_close(phasing.update(x, y, s, "raar", beta), general)
    for algorithm in ("er", "hio", "raar"):  # the two-pass form the iterations use
        a, b = phasing.linear_weights(s, algorithm, beta)
        torch.testing.assert_close(a * y + b * x, phasing.update(x, y, s, algorithm, beta))
    hio_pos = phasing.update(x, y, s, "hio", beta, positivity=True)
    assert hio_pos[1] == torch.complex(torch.tensor(-2 + 0.5), torch.tensor(1.0))
    assert hio_pos[0] == y[0]


def test_initial_supports():
    c = crystal(32, photons=None)
    first = phasing.autocorrelation_support(c.intensity, CdiConfig().support_size)
    # a loose first support: (nearly) all of the crystal, at most a few times its volume
    assert np.sum(c.support & ~first) <= 0.05 * c.support.sum()
    assert first.sum() < 3 * c.support.sum()
    assert phasing.autocorrelation_support(c.intensity, 0.3).sum() < first.sum()
    sw = phasing.shrinkwrap(c.obj, 0.5, 0.2)
    assert post.dice(sw, c.support) > 0.9


# --- batched random starts ------------------------------------------------------------------------------------


def test_a_start_is_the_same_alone_and_in_a_batch():
    c = crystal(32, seed=3)
    settings = dict(iterations=80, final_er=20, shrinkwrap_every=10, device="cpu")
    batch = phasing.retrieve(c.intensity, start_indices=[0, 1, 2], **settings)
    alone = phasing.retrieve(c.intensity, start_indices=[1], **settings)
    assert [r.index for r in batch] == [0, 1, 2] and alone[0].index == 1
    np.testing.assert_allclose(alone[0].obj, batch[1].obj, rtol=0, atol=1e-6 * np.abs(batch[1].obj).max())
    np.testing.assert_array_equal(alone[0].support, batch[1].support)
    assert alone[0].chi2 == pytest.approx(batch[1].chi2, rel=1e-6)
    # different starts and different seeds give different results
    assert not np.allclose(batch[0].obj, batch[1].obj, atol=1e-3 * np.abs(batch[1].obj).max())
    other = phasing.retrieve(c.intensity, start_indices=[1], **{**settings, "seed": 7})
    assert not np.allclose(other[0].obj, batch[1].obj, atol=1e-3 * np.abs(batch[1].obj).max())


def test_masked_voxels_are_free_and_measured_zeros_are_constraints():
    c = crystal(32, photons=None, seed=1)
    centre = 16
    region = np.zeros(c.intensity.shape, bool)
    region[centre - 1:centre + 2, centre - 1:centre + 2, centre + 2:centre + 4] = True  # bright voxels near the peak
    zeroed = c.intensity.copy()
    zeroed[region] = 0
    garbage = c.intensity.copy()
    garbage[region] = 1e9
    settings = dict(iterations=300, final_er=50, starts=2, device="cpu")
    free = phasing.retrieve(zeroed, mask=region, **settings)
    free_garbage = phasing.retrieve(garbage, mask=region, **settings)
    constrained = phasing.retrieve(zeroed, **settings)
    for a, b in zip(free, free_garbage, strict=True):  # masked values do not matter at all
        np.testing.assert_array_equal(a.obj, b.obj)
        assert a.chi2 == b.chi2
    truth = c.intensity[region].mean()
    model_free = np.mean([np.abs(fourier.forward_np(r.obj))[region] ** 2 for r in free])
    model_zero = np.mean([np.abs(fourier.forward_np(r.obj))[region] ** 2 for r in constrained])
    assert 0.5 * truth < model_free < 2 * truth  # the support fills the gap in
    assert model_zero < 0.3 * model_free  # measured zeros pull |F| to 0


def test_result_fields_select_and_average():
    c = crystal(32, seed=2)
    cfg = CdiConfig(iterations=200, final_er=40, starts=4, average=3, device="cpu")
    results = phasing.retrieve(c.intensity, config=cfg)
    res = phasing.select(results[::-1], config=cfg)  # any order in
    chis = np.array([r.chi2 for r in results])
    np.testing.assert_array_equal(res.chi2_starts, chis)
    assert res.best_start == int(np.argmin(chis))
    assert res.obj.dtype == np.complex64 and res.obj.shape == (32, 32, 32)
    assert res.support.dtype == bool and res.support.sum() > 0.5 * c.support.sum()
    assert res.history.shape == (20,) and res.history[-1] < res.history[0]
    assert res.spread is not None and 0 < res.spread < 0.5
    assert res.chi2 == pytest.approx(fourier.chi2(c.intensity, res.obj), rel=1e-4)
    assert res.chi2 < 2 * chis.min()
    assert res.device == "cpu" and res.seconds > 0
    # centred: the amplitude's centre of mass within half a voxel of the array centre
    assert np.all(np.abs(post.centre_of_mass(res.obj, res.support) - 16) <= 0.5 + 1e-9)
    # the same start under its ambiguities (twin, shift, global phase) averages to itself: no spread
    best = results[res.best_start]
    variants = [best.obj, fourier.twin(best.obj), np.roll(best.obj, (1, 0, -2), (0, 1, 2)), best.obj * np.exp(2.5j)]
    copies = [phasing.StartResult(obj=v, support=best.support, chi2=best.chi2 + 1e-6 * k, index=k, history=best.history,
                                  intensity=best.intensity) for k, v in enumerate(variants)]
    same = phasing.select(copies, starts=4, average=4)
    assert same.spread is not None and same.spread < 0.02
    assert same.chi2 == pytest.approx(best.chi2, rel=0.02)
    single = phasing.select(results, config=cfg, average=1)
    assert single.spread is None and single.chi2 == chis.min()
    np.testing.assert_array_equal(np.abs(single.obj), np.abs(np.roll(results[single.best_start].obj,
                                                                      post.centring_roll(results[single.best_start].obj,
                                                                                         results[single.best_start]
                                                                                         .support), (0, 1, 2))))


def test_init_start_zero_uses_it_exactly():
    c = crystal(32, photons=None, seed=4)
    init = scaled(c)
    results = phasing.retrieve(c.intensity, init=init, start_indices=[0, 1], iterations=1, final_er=1, device="cpu")
    f = fourier.forward_np(init)
    expected = fourier.backward_np(np.sqrt(c.intensity) * np.exp(1j * np.angle(f))) * results[0].support
    np.testing.assert_allclose(results[0].obj, expected, atol=1e-4 * np.abs(expected).max())
    assert results[0].chi2 < 1e-6
    assert results[1].chi2 > 100 * results[0].chi2  # start 1: a perturbation of init
    # the first support from |init|: the crystal and a margin
    assert np.all(results[0].support[c.support]) and results[0].support.sum() < 2.5 * c.support.sum()
    res = phasing.phase_retrieval(c.intensity, init=init, starts=2, iterations=50, final_er=20, device="cpu")
    assert res.chi2 < 1e-3 and post.phase_rms_error(res.obj, c.obj, c.support) < 0.02


@pytest.mark.parametrize("algorithm", ["hio", "raar", "er"])
def test_every_algorithm_recovers_a_simple_object(algorithm):
    rng = np.random.default_rng(5)
    sup = box(32)
    phase = 0.4 * np.sin(grid(32)[0] / 3.0) + 0.3 * (grid(32)[2] > 1)
    obj = (sup * np.exp(1j * phase)).astype(np.complex64)
    intensity = rng.poisson(1e6 * np.abs(fourier.forward_np(obj)) ** 2 / sup.sum()).astype(np.float32)
    res = phasing.phase_retrieval(intensity, algorithm=algorithm, iterations=300, final_er=50, starts=2, device="cpu",
                                  support=box(32, (6, 7, 8)))
    error = post.phase_rms_error(res.obj, obj, sup)
    assert res.chi2 < 0.1
    if algorithm != "er":  # ER alone stagnates; HIO and RAAR get the phase
        assert error < 0.15


def test_positivity_on_a_real_object():
    sup = box(32)
    amplitude = sup * (1.0 + 0.3 * np.cos(grid(32)[1] / 2.0))
    intensity = (np.abs(fourier.forward_np(amplitude.astype(np.complex64))) ** 2).astype(np.float32)
    res = phasing.phase_retrieval(intensity, positivity=True, iterations=200, final_er=50, starts=2, device="cpu")
    assert res.chi2 < 1e-2
    assert np.all(res.obj.real >= 0)  # the last ER projects onto Re ≥ 0
    # (unweighted, a corner voxel the reconstruction leaves empty has a random phase; weighted it hardly counts)
    assert post.phase_rms_error(res.obj, amplitude.astype(np.complex64), sup, weighted=True) < 0.05


def test_default_recovery_small():
    """The defaults, untouched: a faceted crystal with domains at 32³, 1e6 photons."""
    c = crystal(32, seed=0, photons=1e6, amplitude=1.5)
    res = phasing.phase_retrieval(c.intensity, device="cpu")
    aligned, sup = post.align(res.obj, reference=c.obj, support=res.support)
    assert post.phase_rms_error(res.obj, c.obj, c.support) <= 0.2
    assert post.dice(sup, c.support) >= 0.9
    assert res.chi2 < 0.05


@pytest.mark.slow
def test_default_recovery_64():
    """The acceptance target: defaults, 64³, size 0.35, domains of 1.5 rad, 1e6 photons."""
    c = crystal(64, seed=1, photons=1e6, amplitude=1.5)
    res = phasing.phase_retrieval(c.intensity, device="cpu")
    aligned, sup = post.align(res.obj, reference=c.obj, support=res.support)
    assert post.phase_rms_error(res.obj, c.obj, c.support) <= 0.2
    assert post.dice(sup, c.support) >= 0.9


def test_one_info_line_per_pattern(caplog):
    c = crystal(16, seed=0)
    with caplog.at_level("INFO", logger="xrdscale.cdi.phasing"):
        phasing.phase_retrieval(c.intensity, iterations=20, final_er=5, starts=2, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "xrdscale.cdi.phasing" and r.levelname == "INFO"]
    assert len(lines) == 1
    assert "2 start(s) × 20 iterations on cpu" in lines[0] and "best χ²" in lines[0]


# --- input errors --------------------------------------------------------------------------------------------


def test_input_errors():
    c = crystal(16, seed=0)
    good = c.intensity
    run = dict(iterations=2, final_er=1, starts=1, device="cpu")
    with pytest.raises(InputError, match=r"3D array .* got shape \(16, 16\)"):
        phasing.phase_retrieval(good[0], **run)
    with pytest.raises(InputError, match="NaN or infinite"):
        phasing.phase_retrieval(np.where(np.arange(16)[:, None, None] == 3, np.nan, good), **run)
    with pytest.raises(InputError, match="negative"):
        phasing.phase_retrieval(good - 5, **run)
    with pytest.raises(InputError, match="zero everywhere"):
        phasing.phase_retrieval(np.zeros_like(good), **run)
    with pytest.raises(InputError, match="real numbers"):
        phasing.phase_retrieval(good.astype(np.complex64), **run)
    with pytest.raises(InputError, match=r"mask has shape \(16, 16, 8\) but the intensity has shape \(16, 16, 16\)"):
        phasing.phase_retrieval(good, mask=np.zeros((16, 16, 8), bool), **run)
    with pytest.raises(InputError, match="masks every voxel"):
        phasing.phase_retrieval(good, mask=np.ones(good.shape, bool), **run)
    with pytest.raises(InputError, match=r"support has shape \(20, 20, 20\) but the intensity has shape "
                                         r"\(16, 16, 16\)"):
        phasing.phase_retrieval(good, support=np.ones((20, 20, 20), bool), **run)
    with pytest.raises(InputError, match="support is empty"):
        phasing.phase_retrieval(good, support=np.zeros(good.shape, bool), **run)
    with pytest.raises(InputError, match=r"initial object has shape \(8, 8, 8\)"):
        phasing.phase_retrieval(good, init=np.ones((8, 8, 8), np.complex64), **run)
    with pytest.raises(InputError, match="repeats an index"):
        phasing.retrieve(good, start_indices=[1, 1], **run)
    with pytest.raises(InputError, match="negative index"):
        phasing.retrieve(good, start_indices=[-1], **run)
    with pytest.raises(InputError, match="no start results"):
        phasing.select([])
    results = phasing.retrieve(good, start_indices=[0], **run)
    with pytest.raises(InputError, match="cannot average the 2 best starts of 1"):
        phasing.select(results, starts=2, average=2)


# --- post-processing ----------------------------------------------------------------------------------------


def test_strain_of_a_linear_ramp_also_when_it_wraps():
    n = 32
    z, y, x = grid(n)
    sup = box(n, (8, 9, 10))
    voxel = (5e-9, 6e-9, 4e-9)
    for g in (0.05, 1.2):  # rad per voxel; 1.2 wraps every ~5 voxels
        obj = sup * np.exp(1j * g * x)
        eps = post.strain(obj, sup, voxel_size_m=voxel, q_norm=Q_NORM)
        assert np.all(np.isnan(eps[~sup]))
        np.testing.assert_allclose(eps[sup], g / voxel[2] / Q_NORM, rtol=1e-6)
    # along an oblique Q: the projection of the gradient
    gz, gx = 0.3, -0.2
    obj = sup * np.exp(1j * (gz * z + gx * x))
    direction = np.array([1.0, 0.0, 1.0]) / np.sqrt(2)
    eps = post.strain(obj, sup, voxel_size_m=voxel, q_direction=(1.0, 0.0, 1.0), q_norm=Q_NORM)
    expected = (direction[0] * gz / voxel[0] + direction[2] * gx / voxel[2]) / Q_NORM
    np.testing.assert_allclose(eps[sup], expected, rtol=1e-6)
    np.testing.assert_allclose(post.displacement(np.full(3, 2.0), Q_NORM), 1e-10)
    with pytest.raises(InputError, match="q_direction"):
        post.strain(obj, sup, voxel_size_m=voxel, q_direction=(0, 0, 0), q_norm=Q_NORM)
    with pytest.raises(InputError, match="q_norm"):
        post.displacement(np.zeros(3), 0.0)
    with pytest.raises(InputError, match="support has shape"):
        post.strain(obj, sup[:4], voxel_size_m=voxel, q_norm=Q_NORM)


def test_strain_on_a_phase_vortex_is_finite_away_from_the_core():
    n = 32
    z, y, x = grid(n)
    sup = box(n, (10, 10, 10))
    xs, ys = x + 0.5, y + 0.5  # the vortex line between voxels, along axis 0
    obj = sup * np.exp(1j * np.arctan2(ys, xs))
    eps = post.strain(obj, sup, voxel_size_m=(1.0, 1.0, 1.0), q_norm=1.0)
    assert np.all(np.isfinite(eps[sup]))
    r = np.hypot(xs, ys)
    far = sup & (r > 4)
    # ∂/∂x atan2(y, x) = −y / r² (the discrete central difference, within a few per cent away from the core)
    np.testing.assert_allclose(eps[far], -ys[far] / r[far] ** 2, atol=0.06 * (1 / r[far]).max())
    assert np.abs(eps[sup]).max() <= np.pi / 2 + 1e-9


def test_centre_ramp_and_mean_phase():
    c = crystal(32, photons=None, seed=5)
    ramp = np.exp(1j * (0.3 * grid(32)[0] - 0.2 * grid(32)[2]))
    moved = np.roll(c.obj * ramp * np.exp(0.7j), (3, -4, 2), axis=(0, 1, 2))
    sup = np.roll(c.support, (3, -4, 2), axis=(0, 1, 2))
    centred, csup = post.centre(moved, sup)
    assert csup is not None
    np.testing.assert_allclose(post.centre_of_mass(centred, csup), 16, atol=0.05)
    back = np.roll(moved, (-3, 4, -2), axis=(0, 1, 2))
    np.testing.assert_allclose(post.phase_ramp(back, c.support, reference=c.obj), [0.3, 0.0, -0.2], atol=1e-5)
    flat = post.zero_mean_phase(post.remove_ramp(back, c.support, reference=c.obj), c.support, reference=c.obj)
    np.testing.assert_allclose(flat[c.support], c.obj[c.support], atol=1e-4)
    z = post.zero_mean_phase(back, c.support)
    assert abs(np.angle(z[c.support].sum())) < 1e-5


def test_twin_register_and_phase_error():
    c = crystal(32, photons=None, seed=6)
    obj = c.obj
    twin = np.roll(fourier.twin(obj), (1, 0, -1), axis=(0, 1, 2))
    back, is_twin = post.resolve_twin(twin, obj)
    assert is_twin
    same, flag = post.resolve_twin(obj, obj)
    assert flag is False and same is obj
    shifted = fourier.fourier_shift(obj, (1.3, -0.6, 2.25))
    registered, shift = post.register(shifted, obj)
    np.testing.assert_allclose(shift, [-1.3, 0.6, -2.25], atol=0.06)
    # every ambiguity at once leaves (almost) no phase error; an added phase error is measured
    ambiguous = np.roll(fourier.twin(obj * np.exp(1j * 0.1 * grid(32)[1]) * np.exp(2.0j)), (2, -1, 3), (0, 1, 2))
    assert post.phase_rms_error(ambiguous, obj, c.support) < 1e-3
    noisy = obj * np.exp(1j * np.random.default_rng(0).normal(0, 0.2, obj.shape))
    assert post.phase_rms_error(noisy, obj, c.support) == pytest.approx(0.2, abs=0.01)
    aligned, sup = post.align(ambiguous, reference=obj, support=np.roll(fourier.twin(c.support).real > 0.5,
                                                                         (2, -1, 3), (0, 1, 2)))
    assert post.dice(sup, c.support) > 0.97
    np.testing.assert_allclose(aligned[c.support], obj[c.support], atol=0.05)
    assert post.dice(c.support, c.support) == 1.0
    assert post.dice(c.support, ~c.support) == 0.0
    with pytest.raises(InputError, match="shapes"):
        post.dice(c.support, c.support[:3])
    with pytest.raises(InputError, match="reference has shape"):
        post.register(obj, obj[:8])
