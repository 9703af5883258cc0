"""The electrochemistry log of an operando cell: time, voltage, current from CSV or a NeXus group.

A CSV log has a header row naming at least a time, a voltage and a current column;
names are matched without case, with the unit in brackets, parentheses or after a slash
(``time/s``, ``Voltage (V)``, ``I [mA]``, ``Ewe/V``; see :data:`ALIASES`): time in s, ms, min
or h, voltage in V or mV, current in A or mA (positive on charge). Lines starting with ``#``
are comments; ``# start_time: 2021-05-04T10:00:00`` gives the wall-clock time of t = 0.

A NeXus/HDF5 log is a group (default ``/entry/echem``; ``FILE.nxs::/path/to/group``
names another) with 1D datasets ``time``, ``voltage`` and ``current`` (their ``units``
attributes read as above) and an optional ``start_time`` attribute or dataset.

:meth:`EchemLog.at` interpolates the log at the scans' times after :meth:`EchemLog.check_covers`
made sure the log spans them; :func:`cycle_numbers` numbers the cycles from the current's
sign (a cycle starts with each charge).

Examples
--------
>>> log = EchemLog(np.array([0.0, 10, 20, 30]), np.array([3.0, 3.5, 4.0, 3.8]),
...                np.array([0.0, 1.0, 1.0, -1.0]), "cell.csv")
>>> log.at(np.array([15.0]))["voltage"].round(2).tolist()
[3.75]
>>> cycle_numbers(np.array([0.0, 3.5, 3.5, -3.5, -3.5, 0.0, 3.5, -3.5])).tolist()
[1, 1, 1, 1, 1, 1, 2, 2]
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import re
from dataclasses import dataclass

import numpy as np

from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.io.frames import time_factor

logger = logging.getLogger(__name__)

#: Column names (lower case, unit removed) accepted for each quantity of a CSV log.
ALIASES = {"time": ("time", "t", "time_s", "elapsed_time", "test_time", "total_time"),
           "voltage": ("voltage", "v", "u", "ewe", "ecell", "cell_voltage", "potential", "voltage_v"),
           "current": ("current", "i", "<i>", "current_a", "i_a")}
#: Scale of each unit to V or A.
ELECTRIC_UNITS = {"v": 1.0, "mv": 1e-3, "a": 1.0, "ma": 1e-3}
#: Default group of a NeXus log.
NEXUS_GROUP = "entry/echem"
#: Fraction of the largest |current| below which the cell is at rest.
REST_FRACTION = 0.02


@dataclass(frozen=True)
class EchemLog:
    """An electrochemistry log: ``time`` [s from ``start_time``], ``voltage`` [V], ``current`` [A].

    ``source`` names the log in messages; ``start_time`` (ISO 8601) is the wall-clock time of
    t = 0 where the log gives it.
    """

    time: np.ndarray
    voltage: np.ndarray
    current: np.ndarray
    source: str
    start_time: str | None = None

    def shifted_to(self, start_time: str | None) -> EchemLog:
        """The log on the clock of a scan series that starts at ``start_time`` (as is when either is unknown)."""
        if not start_time or not self.start_time:
            return self
        offset = (_parse_time(self.start_time, self.source) - _parse_time(start_time, "the raw file")).total_seconds()
        if offset == 0:
            return self
        logger.info("echem log %s starts %.0f s after the scans' t = 0; its times are shifted", self.source, offset)
        return EchemLog(self.time + offset, self.voltage, self.current, self.source, start_time)

    def check_covers(self, times: np.ndarray, what: str) -> None:
        """Raise :class:`InputError` unless the log spans ``times`` (the scans of ``what``).

        A scan may lie up to one logging interval beyond either end.
        """
        times = np.asarray(times, dtype=float)
        step = float(np.median(np.diff(self.time)))
        lo, hi = float(self.time[0]) - step, float(self.time[-1]) + step
        outside = np.flatnonzero((times < lo) | (times > hi))
        if outside.size:
            raise InputError(
                f"the echem log {self.source} covers t = {self.time[0]:.6g} … {self.time[-1]:.6g} s but "
                f"{outside.size} of the {times.size} scans of {what} lie outside it (scans at t = {times.min():.6g} … "
                f"{times.max():.6g} s; the first outside at {times[outside[0]]:.6g} s); give the log of the whole "
                "experiment, or check that the log and the raw file share their t = 0 (start_time)")

    def at(self, times: np.ndarray) -> dict[str, np.ndarray]:
        """``voltage``, ``current``, ``cycle`` and ``step`` (+1 charge, −1 discharge, 0 rest) at ``times``.

        Voltage is interpolated linearly; current, cycle and step are those of the last log
        entry at or before each time (the potentiostat holds them between entries).
        """
        times = np.asarray(times, dtype=float)
        idx = np.clip(np.searchsorted(self.time, times, side="right") - 1, 0, self.time.size - 1)
        return {"voltage": np.interp(times, self.time, self.voltage), "current": self.current[idx],
                "cycle": cycle_numbers(self.current)[idx], "step": steps(self.current)[idx]}


def steps(current: np.ndarray, rest_fraction: float = REST_FRACTION) -> np.ndarray:
    """+1 on charge, −1 on discharge, 0 at rest (|I| below ``rest_fraction`` of the largest |I|)."""
    current = np.asarray(current, dtype=float)
    peak = float(np.abs(current).max()) if current.size else 0.0
    out = np.sign(current).astype(np.int8)
    out[np.abs(current) <= rest_fraction * peak] = 0
    return out


def cycle_numbers(current: np.ndarray, rest_fraction: float = REST_FRACTION) -> np.ndarray:
    """Cycle of every log entry: 1 until the second charge starts, then one more at each charge start.

    A charge starts where the step becomes +1 after a discharge (rests in between do not count),
    so a log that begins with a charge or a rest is in cycle 1 until its second charge.
    """
    s = steps(current, rest_fraction)
    moving = s[s != 0]
    starts = np.zeros(s.size, dtype=np.int32)
    where = np.flatnonzero(s != 0)
    if moving.size:
        new = np.r_[False, (moving[1:] == 1) & (moving[:-1] == -1)]
        starts[where[new]] = 1
    return 1 + np.cumsum(starts).astype(np.int32)


def read_echem(url: str) -> EchemLog:
    """Read an electrochemistry log from a CSV file or a NeXus/HDF5 group (``FILE.nxs::/group``).

    Raises
    ------
    InputError
        A missing time, voltage or current column (or dataset), unknown units, non-numeric or
        non-finite values, fewer than two entries, or times that do not increase.
    StorageError
        The file cannot be read.
    """
    path, _, group = url.partition("::")
    low = path.lower()
    if low.endswith((".nxs", ".h5", ".hdf5", ".nx5", ".nexus")):
        log = _read_nexus(path, group or NEXUS_GROUP)
    else:
        log = _read_csv(path)
    return _validated(log)


def _parse_time(text: str, where: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(f"{where}: start_time {text!r} is not an ISO 8601 time (e.g. 2021-05-04T10:00:00)") from exc
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _split_unit(name: str) -> tuple[str, str | None]:
    """``'Voltage (V)'`` → ``('voltage', 'v')``; ``'time/s'`` → ``('time', 's')``."""
    text = name.strip().lower()
    m = re.match(r"^(.*?)\s*[\[(]\s*([^\])]*)\s*[\])]\s*$", text) or re.match(r"^(.*?)\s*/\s*(\S+)$", text)
    base, unit = (m.group(1), m.group(2)) if m else (text, None)
    return base.strip().replace(" ", "_"), unit


def _electric(unit: str | None, quantity: str, where: str) -> float:
    if unit is None:
        return 1.0
    key = unit.strip().lower()
    expected = ("v", "mv") if quantity == "voltage" else ("a", "ma")
    if key not in expected:
        raise InputError(f"{where}: {quantity} has units {unit!r}; expected {' or '.join(u.upper() for u in expected)}"
                         .replace("MV", "mV").replace("MA", "mA"))
    return ELECTRIC_UNITS[key]


def _read_csv(url: str) -> EchemLog:
    name = storage.redact(url)
    text = storage.read_bytes(url).decode("utf-8-sig", "replace")
    start = None
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = re.match(r"^\s*#\s*start_time\s*[:=]\s*(\S+)", line)
            start = m.group(1) if m else start
        elif line.strip():
            lines.append(line)
    dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t") if lines else csv.excel
    rows = list(csv.reader(io.StringIO("\n".join(lines)), dialect))
    if len(rows) < 3:
        raise InputError(f"echem log {name} has {max(len(rows) - 1, 0)} data row(s); it needs a header row "
                         "(time, voltage, current) and at least two rows of values")
    header = [_split_unit(h) for h in rows[0]]
    columns: dict[str, tuple[int, str | None]] = {}
    for quantity, names in ALIASES.items():
        for j, (base, unit) in enumerate(header):
            if base in names and quantity not in columns:
                columns[quantity] = (j, unit)
    missing = [q for q in ALIASES if q not in columns]
    if missing:
        raise InputError(f"echem log {name} lacks the column(s) {', '.join(missing)} (its header is "
                         f"{', '.join(rows[0])}); it needs time, voltage and current columns, e.g. "
                         "'time/s,voltage/V,current/A' (current > 0 on charge)")
    values = {}
    for quantity, (j, unit) in columns.items():
        factor = (time_factor(unit, f"echem log {name}: column {rows[0][j]}") if quantity == "time"
                  else _electric(unit, quantity, f"echem log {name}"))
        try:
            values[quantity] = np.array([float(r[j]) for r in rows[1:]]) * factor
        except (ValueError, IndexError) as exc:
            raise InputError(f"echem log {name}: column {rows[0][j]!r} holds a missing or non-numeric value "
                             f"({exc}); every row needs a number in each of time, voltage and current") from exc
    return EchemLog(values["time"], values["voltage"], values["current"], name, start)


def _read_nexus(url: str, group: str) -> EchemLog:
    import h5py

    from xrdscale.io.frames import _open_h5

    name = f"{storage.redact(url)}::/{group.strip('/')}"
    with storage.io_errors(url, "read the echem log"), _open_h5(url) as h5:
        g = h5.get(group.strip("/"))
        if not isinstance(g, h5py.Group):
            raise InputError(f"echem log {storage.redact(url)} has no group /{group.strip('/')}; a NeXus log is a "
                             "group with time, voltage and current datasets (name another with FILE.nxs::/group)")
        missing = [k for k in ALIASES if not isinstance(g.get(k), h5py.Dataset)]
        if missing:
            raise InputError(f"echem log {name} lacks the dataset(s) {', '.join(missing)} (it has "
                             f"{', '.join(sorted(g)) or 'nothing'}); it needs time, voltage and current")
        values = {}
        for k in ALIASES:
            unit = g[k].attrs.get("units")
            unit = unit.decode() if isinstance(unit, bytes) else unit
            factor = time_factor(unit, f"echem log {name}/time") if k == "time" else _electric(unit, k, name)
            values[k] = np.asarray(g[k][()], dtype=np.float64).ravel() * factor
        start = g.attrs.get("start_time", g["start_time"][()] if "start_time" in g else None)
        start = start.decode() if isinstance(start, bytes) else (None if start is None else str(start))
    return EchemLog(values["time"], values["voltage"], values["current"], name, start)


def _validated(log: EchemLog) -> EchemLog:
    n = {k: getattr(log, k).size for k in ALIASES}
    if len(set(n.values())) != 1:
        raise InputError(f"echem log {log.source}: time, voltage and current have different lengths {n}")
    if log.time.size < 2:
        raise InputError(f"echem log {log.source} has {log.time.size} entry; it needs at least two")
    for k in ALIASES:
        bad = np.flatnonzero(~np.isfinite(getattr(log, k)))
        if bad.size:
            raise InputError(f"echem log {log.source}: {k} is not finite at entry {bad[0]} ({bad.size} entries); "
                             "remove or repair those rows")
    back = np.flatnonzero(np.diff(log.time) <= 0)
    if back.size:
        i = int(back[0])
        raise InputError(f"echem log {log.source}: time does not increase at entry {i + 1} ({log.time[i]:.6g} then "
                         f"{log.time[i + 1]:.6g} s); give the log in time order without repeated times")
    return log


def write_csv(url: str, log: EchemLog) -> str:
    """Write ``log`` as a CSV log (``time/s,voltage/V,current/A``, the start time as a comment)."""
    lines = [f"# start_time: {log.start_time}"] if log.start_time else []
    lines.append("time/s,voltage/V,current/A")
    lines += [f"{t:.3f},{v:.5f},{i:.5f}" for t, v, i in zip(log.time, log.voltage, log.current, strict=True)]
    storage.write_bytes(url, ("\n".join(lines) + "\n").encode())
    return url
