"""The PQ-Net network: a shared pattern block, a phase block per phase, a route per output.

Architecture (Dong et al., npj Comput. Mater. 7, 74 (2021); seed 000, Figures S31–S33):

- **pattern block**: 1D convolutions shared by all phases, then one max-pooling (stride 2);
- **phase block** (one per phase): convolutions, each followed by max-pooling with stride 2;
- **parameter block** (one per phase): after flattening, one route per predicted
  parameter (fully connected → ReLU → 10 % dropout → fully connected to one value).
  For a single-phase lattice model (scale, a, c) this is the paper's split into three
  routes after the flatten layer.

The per-phase blocks are evaluated together: the phase blocks as one grouped
convolution stack (``groups = n_phases``), the routes as one batched matrix product.
This computes exactly what separate per-phase modules compute but in a few large
kernels, which is what makes a 13-phase model fast on a CPU.

Normalisation lives in the model so that every caller gets absolute units: an input
pattern is divided by its mean intensity ``n``; the network predicts standardised
targets; the outputs are un-standardised and every ``scale`` output is multiplied by
``n`` again. A pattern ``k`` times stronger therefore gives ``k`` times the scale
factors and the same lattice parameters and crystallite sizes.

Scale factors are non-negative by construction (:attr:`ModelSpec.nonnegative_scale`): the
un-standardised output of a scale route is a sharp softplus of the route's affine output,
``scale / n = softplus_β(r · std + mean)`` with ``β = b / std`` (:attr:`ModelSpec.softplus_beta`
``b`` = 100), so the transition to zero is about a hundredth of the target's standard deviation
wide: the output is ``max(r, 0)`` to within ``ln 2 / b`` of a std. That width matters: a phase
absent from a pattern is lifted by up to it, times the pattern's mean intensity in absolute
units; with ``b`` = 10 a 39-output model's LixC scales lost 0.08 of held-out R² (0.985 → 0.905),
which ``b`` = 100 gives back (0.985). :meth:`PQNet.standardised` returns
``(scale / n − mean) / std`` of that output. Training takes its loss on the routes' affine
outputs :meth:`PQNet.raw_outputs` instead (MAE on standardised targets): through the softplus,
the patterns without a phase (target 0, output always > 0) push its route down with a gradient
that fades as it goes, and a route can die at 0 (a 39-output model's separator did). Entries
written before this option keep their affine scale outputs (:meth:`ModelSpec.from_dict` reads a
missing key as False).

The absolute units are those of the pattern model of shared/DESIGN.md,
``I_hkl = scale · m|F|² · LP / V²`` (:mod:`xrdscale.physics.pattern`), and they are the
library's: the network learns ``scale / n`` from library patterns, so its scale factors are
in the units its library was simulated in. A model therefore records the intensity constant
of that pattern model (:attr:`ModelSpec.intensity_unit`, K = 1). Registry entries written
before it was recorded were trained on libraries with K = 10⁻², whose scale factors are 100
times those of the contract: :meth:`ModelSpec.from_dict` refuses them (retrain, don't misread).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from xrdscale.physics.constants import INTENSITY_UNIT

logger = logging.getLogger(__name__)

#: Intensities below this mean are treated as empty patterns (no scale, no parameters).
EMPTY_NORM = 1e-12


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a PQ-Net member (stored in the registry entry).

    Parameters
    ----------
    phases : tuple of str
        Phase names, in library order.
    routes : tuple of (str, str)
        The predicted outputs as ``(phase, param)`` with ``param`` one of
        ``scale``, ``a``, ``c``, ``size_nm``, ``q``, ``fwhm``.
    npt : int
        Number of q points of the input pattern.
    target_mean, target_std : tuple of float
        Standardisation of each route's target (the scale routes are in units of
        the pattern's mean intensity).
    pattern_channels, phase_channels, hidden : int
        Widths of the pattern block, of each phase block, and of each route.
    pattern_kernels, phase_kernels : tuple of int
        Kernel sizes of the convolutions of the pattern block and of each phase block.
    dropout : float
        Dropout rate of the parameter block.
    intensity_unit : float
        Intensity constant K of the pattern model of the training library
        (``I_hkl = K · scale · m|F|² · LP / V²``): :data:`xrdscale.physics.constants.INTENSITY_UNIT`
        (1), the only one a :class:`PQNet` accepts.
    nonnegative_scale : bool
        Scale outputs through a sharp softplus (≥ 0 by construction, see the module docstring);
        False for the affine outputs of models trained before the option existed.
    softplus_beta : float
        Sharpness ``b`` of that softplus, in units of 1 / std (entries without it: 10).
    """

    phases: tuple[str, ...]
    routes: tuple[tuple[str, str], ...]
    npt: int
    target_mean: tuple[float, ...]
    target_std: tuple[float, ...]
    pattern_channels: int = 16
    phase_channels: int = 8
    hidden: int = 32
    pattern_kernels: tuple[int, ...] = (7, 5)
    phase_kernels: tuple[int, ...] = (3, 3, 3)
    dropout: float = 0.1
    intensity_unit: float = INTENSITY_UNIT
    nonnegative_scale: bool = True
    softplus_beta: float = 100.0

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        d = asdict(self)
        d["routes"] = [list(r) for r in self.routes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """Inverse of :meth:`to_dict`.

        A ``d`` without ``nonnegative_scale`` (an entry written before the option) gets False:
        its members were trained with affine scale outputs and keep them.

        Raises
        ------
        ValueError
            ``d`` has no ``intensity_unit``: a model trained before xrdscale recorded it,
            on libraries with K = 10⁻², whose scale factors would be 100 times the contract's.
        """
        d = dict(d)
        d.setdefault("nonnegative_scale", False)
        d.setdefault("softplus_beta", 10.0)   # the sharpness of the entries written before it was recorded
        if "intensity_unit" not in d:
            raise ValueError("the network was trained on patterns of the old intensity constant K = 1e-2 (it records "
                             "no intensity_unit), so its scale factors would be 100 times those of the pattern "
                             "model (K = 1)")
        d["phases"] = tuple(d["phases"])
        d["routes"] = tuple((str(p), str(k)) for p, k in d["routes"])
        for key in ("target_mean", "target_std", "pattern_kernels", "phase_kernels"):
            d[key] = tuple(d[key])
        return cls(**d)

    @property
    def scale_mask(self) -> tuple[bool, ...]:
        """True for the routes that are scale factors (multiplied by the pattern norm)."""
        return tuple(param == "scale" for _, param in self.routes)

    def pooled_length(self) -> int:
        """Length of each phase block's feature map after its max-pooling layers."""
        n = self.npt // 2  # the pattern block ends with one max-pooling layer
        for _ in self.phase_kernels:
            n //= 2
        return n


class PQNet(nn.Module):
    """One PQ-Net member.

    ``forward`` maps raw patterns ``(batch, npt)`` in absolute units to outputs
    ``(batch, n_routes)`` in absolute units (see the module docstring).

    Parameters
    ----------
    spec : ModelSpec
        Architecture and normalisation.
    """

    route_phase: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor
    scale_mask: torch.Tensor
    softplus_mask: torch.Tensor
    softplus_offset: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        n_phases = len(spec.phases)
        if spec.intensity_unit != INTENSITY_UNIT:
            raise ValueError(f"the network was trained on patterns with intensity constant "
                             f"K = {spec.intensity_unit:g}; xrdscale's pattern model has K = {INTENSITY_UNIT:g}: "
                             "retrain it on a new library")
        if spec.pooled_length() < 1:
            raise ValueError(f"npt={spec.npt} is too short for {len(spec.phase_kernels)} pooling layers")
        layers: list[nn.Module] = []
        c_in = 1
        for k in spec.pattern_kernels:
            layers += [nn.Conv1d(c_in, spec.pattern_channels, k, padding=k // 2), nn.ReLU()]
            c_in = spec.pattern_channels
        layers.append(nn.MaxPool1d(2, stride=2))
        self.pattern_block = nn.Sequential(*layers)
        width = n_phases * spec.phase_channels
        layers = []
        for i, k in enumerate(spec.phase_kernels):
            # The first conv of every phase block sees all shared channels (groups=1);
            # later ones only their own phase's channels (groups=n_phases).
            groups = 1 if i == 0 else n_phases
            layers += [nn.Conv1d(c_in, width, k, padding=k // 2, groups=groups), nn.ReLU(),
                       nn.MaxPool1d(2, stride=2)]
            c_in = width
        self.phase_blocks = nn.Sequential(*layers)
        phase_index = {p: i for i, p in enumerate(spec.phases)}
        self.register_buffer("route_phase", torch.tensor([phase_index[p] for p, _ in spec.routes]),
                             persistent=False)
        n_routes = len(spec.routes)
        n_feat = spec.phase_channels * spec.pooled_length()
        self.w1 = nn.Parameter(torch.empty(n_routes, n_feat, spec.hidden))
        self.b1 = nn.Parameter(torch.zeros(n_routes, spec.hidden))
        self.w2 = nn.Parameter(torch.empty(n_routes, spec.hidden))
        self.b2 = nn.Parameter(torch.zeros(n_routes))
        bound1, bound2 = n_feat ** -0.5, spec.hidden ** -0.5
        nn.init.uniform_(self.w1, -bound1, bound1)
        nn.init.uniform_(self.w2, -bound2, bound2)
        self.dropout = nn.Dropout(spec.dropout)
        self.register_buffer("target_mean", torch.tensor(spec.target_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("target_std", torch.tensor(spec.target_std, dtype=torch.float32), persistent=False)
        self.register_buffer("scale_mask", torch.tensor(spec.scale_mask, dtype=torch.bool), persistent=False)
        softplus = [m and spec.nonnegative_scale for m in spec.scale_mask]
        self.register_buffer("softplus_mask", torch.tensor(softplus, dtype=torch.bool), persistent=False)
        # mean / std of each route: in standardised units the scale output is zero at -mean/std
        offset = [mu / sd if sp else 0.0 for mu, sd, sp in zip(spec.target_mean, spec.target_std, softplus)]
        self.register_buffer("softplus_offset", torch.tensor(offset, dtype=torch.float32), persistent=False)

    def raw_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The affine outputs ``r`` of the routes on normalised patterns ``(batch, npt)``, before the output layer."""
        b = x.shape[0]
        h = self.pattern_block(x.unsqueeze(1))
        h = self.phase_blocks(h)                                    # (b, P*C, L)
        h = h.reshape(b, len(self.spec.phases), -1)                 # (b, P, C*L)
        h = h.index_select(1, self.route_phase)                     # (b, R, F)
        h = torch.einsum("brf,rfh->brh", h, self.w1) + self.b1
        h = self.dropout(torch.relu(h))
        return (h * self.w2).sum(-1) + self.b2                      # (b, R)

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Network output on normalised patterns ``(batch, npt)``: standardised targets.

        The routes' affine outputs ``r``, with the sharp softplus of the scale routes when
        :attr:`ModelSpec.nonnegative_scale`: in standardised units ``t = r + mean/std``,
        ``softplus_β(t · std) / std = softplus(b t) / b``, so the output is
        ``softplus(b (r + mean/std)) / b − mean/std`` (≥ ``−mean/std``, i.e. scale ≥ 0).
        """
        r = self.raw_outputs(x)
        if not self.spec.nonnegative_scale:
            return r
        return torch.where(self.softplus_mask, self._softplus(r) - self.softplus_offset, r)

    def _softplus(self, r: torch.Tensor) -> torch.Tensor:
        """``softplus(b (r + mean/std)) / b``: the scale output over its std (≥ 0)."""
        b = float(self.spec.softplus_beta)
        return nn.functional.softplus(b * (r + self.softplus_offset)) / b

    def forward(self, patterns: torch.Tensor) -> torch.Tensor:
        """Outputs in absolute units for raw patterns ``(batch, npt)``."""
        norm = pattern_norm(patterns)
        r = self.raw_outputs(patterns / norm)
        y = r * self.target_std + self.target_mean
        if self.spec.nonnegative_scale:  # std · softplus: ≥ 0 exactly (no −mean + mean rounding)
            y = torch.where(self.softplus_mask, self._softplus(r) * self.target_std, y)
        return torch.where(self.scale_mask, y * norm, y)


def pattern_norm(patterns: torch.Tensor) -> torch.Tensor:
    """The input normalisation of :class:`PQNet`: each pattern's mean intensity (clamped)."""
    return patterns.mean(dim=1, keepdim=True).clamp_min(EMPTY_NORM)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
