"""The cycling truth of an operando cell: galvanostatic protocol, voltage curve, anode phases over time.

A simulated 18650 NCA/graphite cell at 1C (3.5 A) between 2.65 and 4.2 V, as in the
point measurements of the paper's Figure 3 (seed 000): a rest at open circuit, then per
cycle a constant-current charge, a rest at the top of charge, a constant-current discharge
and a rest at the bottom. The voltage is ``OCV(SOC) + I R`` with an open-circuit curve that
has the plateaus of the staged graphite anode (monotone PCHIP through :data:`OCV_TABLE`) and
relaxes with ``exp(-t/τ)`` when the current stops.

The anode's four LiCx phases (LiC6, LiC12, LiC30, graphite, the 4LiCx model's) follow the
paper's sequence, piecewise linear in the state of charge (weight %, summing to 100):

- first charge from pristine graphite: graphite falls fast, LiC30 peaks near 90 % at ~3.7 V,
  then LiC12 grows to 55 % while LiC30 falls to 25 %; LiC6 grows above 4 V to 20 % at 4.2 V;
- rest at 4.2 V: LiC6 20 → 10 %, LiC12 55 → 70 %, LiC30 25 → 20 % (lithium re-equilibrates);
- discharge: LiC12 disappears at ~3 V, LiC30 rises to ~50 % near 3.1 V and ends at 20 %,
  graphite reappears below ~3.3 V and ends at 80 %;
- later charges start from that 80/20 state and reach ~100 % LiC30 at ~3.7 V.

Examples
--------
>>> p = Protocol(cycles=1)
>>> t = np.array([0.0, p.rest_start_s + 0.25 * p.step_s])
>>> truth = cycling_truth(t, p)
>>> [round(float(v), 2) for v in truth.voltage]
[2.75, 3.68]
>>> [round(float(w), 1) for w in truth.weight_percent[1]]
[0.0, 5.0, 90.0, 5.0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from xrdscale.exceptions import ConfigError

logger = logging.getLogger(__name__)

#: The anode phases of the 4LiCx model (xrdscale/data/phases/licx4.yaml), in its order.
PHASES: tuple[str, ...] = ("LiC6", "LiC12", "LiC30", "graphite")

#: Open-circuit voltage [V] against state of charge (plateaus of the staged graphite anode).
OCV_TABLE = ((0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0),
             (2.755, 3.15, 3.35, 3.52, 3.62, 3.68, 3.78, 3.90, 4.01, 4.095))

#: Weight % of (LiC6, LiC12, LiC30, graphite) at anchor states of charge, per branch.
FIRST_CHARGE = ((0.0, 0.05, 0.25, 0.5, 0.75, 1.0),
                ((0, 0, 0, 0, 0, 20), (0, 0, 5, 30, 55, 55), (0, 40, 90, 70, 45, 25), (100, 60, 5, 0, 0, 0)))
LATER_CHARGE = ((0.0, 0.2, 0.5, 0.75, 1.0),
                ((0, 0, 0, 0, 20), (0, 0, 30, 55, 55), (20, 100, 70, 45, 25), (80, 0, 0, 0, 0)))
DISCHARGE = ((0.0, 0.05, 0.1, 0.2, 0.45, 0.85, 1.0),
             ((0, 0, 0, 0, 0, 0, 10), (0, 0, 5, 20, 45, 70, 70), (20, 50, 60, 80, 55, 30, 20),
              (80, 50, 35, 0, 0, 0, 0)))
#: Weight % at the start of the rest at the top of charge and at its end (relaxation).
TOP_RELAXED = (10.0, 70.0, 20.0, 0.0)

#: Codes of the ``step`` of each time: rest, charge, discharge.
REST, CHARGE, DISCHARGE_STEP = 0, 1, -1


@dataclass(frozen=True)
class Protocol:
    """A galvanostatic cycling protocol and the cell's simple electrical model.

    Attributes
    ----------
    cycles : int
        Full cycles (charge, rest, discharge, rest).
    capacity_ah : float
        Capacity [Ah]; 1C = ``capacity_ah`` A (3.5 A for the paper's 18650 cell).
    c_rate : float
        Charge and discharge rate (1: one hour per step).
    resistance_ohm : float
        Internal resistance (the IR step when the current starts or stops).
    tau_s : float
        Time constant of the voltage relaxation after the current stops.
    rest_start_s, rest_top_s, rest_bottom_s : float
        Rests before the first charge, after each charge and after each discharge.
    """

    cycles: int = 2
    capacity_ah: float = 3.5
    c_rate: float = 1.0
    resistance_ohm: float = 0.03
    tau_s: float = 120.0
    rest_start_s: float = 300.0
    rest_top_s: float = 600.0
    rest_bottom_s: float = 600.0

    def __post_init__(self) -> None:
        if self.cycles < 1 or self.c_rate <= 0 or self.capacity_ah <= 0:
            raise ConfigError(f"cycling protocol: cycles={self.cycles}, c_rate={self.c_rate}, capacity_ah="
                              f"{self.capacity_ah}; give at least one cycle and a positive rate and capacity")

    @property
    def current_a(self) -> float:
        """Magnitude of the charge and discharge current [A]."""
        return self.capacity_ah * self.c_rate

    @property
    def step_s(self) -> float:
        """Duration of one charge or discharge [s]."""
        return 3600.0 / self.c_rate

    @property
    def cycle_s(self) -> float:
        """Duration of one cycle with its rests [s]."""
        return 2 * self.step_s + self.rest_top_s + self.rest_bottom_s

    @property
    def duration_s(self) -> float:
        """Duration of the whole protocol [s]."""
        return self.rest_start_s + self.cycles * self.cycle_s


@dataclass(frozen=True)
class CyclingTruth:
    """The cell's state at given times.

    ``time`` [s from the start], ``voltage`` [V], ``current`` [A, > 0 on charge], ``soc``
    (0–1), ``cycle`` (1-based), ``step`` (:data:`CHARGE`, :data:`DISCHARGE_STEP`, :data:`REST`)
    and ``weight_percent`` (time, phase) in the order of :data:`PHASES`.
    """

    time: np.ndarray
    voltage: np.ndarray
    current: np.ndarray
    soc: np.ndarray
    cycle: np.ndarray
    step: np.ndarray
    weight_percent: np.ndarray


def ocv(soc: np.ndarray) -> np.ndarray:
    """Open-circuit voltage [V] at the state of charge ``soc`` (0–1)."""
    from scipy.interpolate import PchipInterpolator

    return PchipInterpolator(*OCV_TABLE)(np.clip(soc, 0.0, 1.0))


def _branch(table: tuple, soc: np.ndarray) -> np.ndarray:
    """Weight % (n, phase) of a branch table at ``soc``."""
    x, rows = table
    return np.stack([np.interp(soc, x, np.asarray(r, dtype=float)) for r in rows], axis=1)


def cycling_truth(time_s: np.ndarray, protocol: Protocol | None = None) -> CyclingTruth:
    """The cell's voltage, current and anode phase fractions at ``time_s`` (seconds from the start).

    Parameters
    ----------
    time_s : ndarray
        Times in [0, ``protocol.duration_s``].
    protocol : Protocol, optional
        Default: two 1C cycles of the 3.5 Ah cell.

    Returns
    -------
    CyclingTruth
    """
    p = protocol or Protocol()
    t = np.asarray(time_s, dtype=float)
    n = t.size
    soc, current, cycle, step = np.zeros(n), np.zeros(n), np.ones(n, dtype=np.int32), np.zeros(n, dtype=np.int8)
    since_stop = np.full(n, np.inf)   # seconds since the current last stopped
    last_current = np.zeros(n)        # the current before that stop
    wt = np.zeros((n, len(PHASES)))
    wt[:, PHASES.index("graphite")] = 100.0
    rel = t - p.rest_start_s
    for c in range(p.cycles):
        t0 = c * p.cycle_s
        charge = (rel >= t0) & (rel < t0 + p.step_s)
        top = (rel >= t0 + p.step_s) & (rel < t0 + p.step_s + p.rest_top_s)
        d0 = t0 + p.step_s + p.rest_top_s
        dis = (rel >= d0) & (rel < d0 + p.step_s)
        bottom = (rel >= d0 + p.step_s) & ((rel < d0 + p.step_s + p.rest_bottom_s) | (c == p.cycles - 1))
        x = (rel - t0) / p.step_s
        soc[charge], current[charge], step[charge] = x[charge], p.current_a, CHARGE
        wt[charge] = _branch(FIRST_CHARGE if c == 0 else LATER_CHARGE, x[charge])
        soc[top] = 1.0
        since_stop[top], last_current[top] = rel[top] - (t0 + p.step_s), p.current_a
        f = np.clip((rel[top] - (t0 + p.step_s)) / p.rest_top_s, 0, 1)[:, None]
        end = _branch(FIRST_CHARGE if c == 0 else LATER_CHARGE, np.ones(1))
        wt[top] = (1 - f) * end + f * np.asarray(TOP_RELAXED)
        xd = 1.0 - (rel - d0) / p.step_s
        soc[dis], current[dis], step[dis] = xd[dis], -p.current_a, DISCHARGE_STEP
        wt[dis] = _branch(DISCHARGE, xd[dis])
        soc[bottom] = 0.0
        since_stop[bottom], last_current[bottom] = rel[bottom] - (d0 + p.step_s), -p.current_a
        wt[bottom] = _branch(DISCHARGE, np.zeros(1))
        cycle[charge | top | dis | bottom] = c + 1
    relax = np.exp(-np.where(np.isfinite(since_stop), since_stop, np.inf) / p.tau_s)
    voltage = ocv(soc) + p.resistance_ohm * (current + last_current * relax)
    return CyclingTruth(time=t, voltage=voltage, current=current, soc=soc, cycle=cycle, step=step,
                        weight_percent=wt)


def echem_log(protocol: Protocol | None = None, *, interval_s: float = 10.0, noise_v: float = 5e-4,
              seed: int = 0) -> CyclingTruth:
    """The potentiostat's log: the truth every ``interval_s`` with a little voltage noise."""
    p = protocol or Protocol()
    if interval_s <= 0:
        raise ConfigError(f"echem log interval {interval_s} s; give a positive interval")
    t = np.arange(0.0, p.duration_s + 0.5 * interval_s, interval_s)
    truth = cycling_truth(t, p)
    noisy = truth.voltage + noise_v * np.random.default_rng(seed).standard_normal(t.size)
    return CyclingTruth(time=t, voltage=noisy, current=truth.current, soc=truth.soc, cycle=truth.cycle,
                        step=truth.step, weight_percent=truth.weight_percent)
