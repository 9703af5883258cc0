"""The three-plane component separation of the XCS paper (Eqs. 2–3), with Poisson variances.

The sheet beam probes three planes of the cell: R1 (cathode + SPE + part of the anode),
R2 (SPE + part of the anode) and R3 (anode only). With α the anode volume in R2 and β the
anode volume in R1, both relative to the anode volume in R3:

    I_s = I_R2 − α · I_R3                    (Eq. 2, the SPE)
    I_c = I_R1 − I_s − β · I_R3              (Eq. 3, the cathode)
        = I_R1 − I_R2 + (α − β) · I_R3

and the anode is I_R3 itself. The planes are independent Poisson measurements, so the
variances follow by linearity: var I_s = R2 + α² R3, var I_c = R1 + R2 + (α − β)² R3.

α and β are geometry (the paper takes them from the CT volume): give them, or take them
from the anode fractions of the beam planes in a segmented CT volume
(:func:`alpha_beta_from_fractions`, :func:`plane_fractions`). They cannot be fitted from the
spectra alone: the anode's Li and the cathode's Li have one atomic Compton profile, so
β · I_R3 and the cathode's Li signal are collinear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xrdscale.exceptions import InputError

#: the components, in the order :func:`separate` returns them
COMPONENTS = ("cathode", "spe", "anode")


def separate(r1: np.ndarray, r2: np.ndarray, r3: np.ndarray, *, alpha: float,
             beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Component spectra and their variances from the three planes (Eqs. 2–3).

    Parameters
    ----------
    r1, r2, r3 : ndarray
        Counts of the planes R1, R2, R3, one shape (``(..., bin)``).
    alpha, beta : float
        Anode volume in R2 and in R1 relative to R3 (≥ 0).

    Returns
    -------
    components : ndarray
        ``(3, ...)``: cathode, SPE, anode (:data:`COMPONENTS`).
    variances : ndarray
        ``(3, ...)``: their Poisson variances.
    """
    if alpha < 0 or beta < 0:
        raise InputError(f"α and β are volume ratios ≥ 0; got α = {alpha}, β = {beta}")
    r1, r2, r3 = (np.asarray(r, dtype=np.float64) for r in (r1, r2, r3))
    if not (r1.shape == r2.shape == r3.shape):
        raise InputError(f"the three planes must have one shape; got R1 {r1.shape}, R2 {r2.shape}, R3 {r3.shape}")
    spe = r2 - alpha * r3
    cathode = r1 - spe - beta * r3
    v1, v2, v3 = (np.clip(r, 0, None) for r in (r1, r2, r3))
    var_spe = v2 + alpha ** 2 * v3
    var_cathode = v1 + v2 + (alpha - beta) ** 2 * v3
    return np.stack([cathode, spe, r3]), np.stack([var_cathode, var_spe, v3])


def plane_fractions(labels: np.ndarray, planes: Sequence[tuple[int, int]], *, component: int = 1,
                    axis: int = 0) -> np.ndarray:
    """Volume of ``component`` in each beam plane (a slab ``[z0, z1)`` along ``axis``), in voxels.

    Raises
    ------
    InputError
        A plane outside the volume or empty.
    """
    lab = np.asarray(labels)
    n = lab.shape[axis]
    out = []
    for z0, z1 in planes:
        if not (0 <= z0 < z1 <= n):
            raise InputError(f"beam plane [{z0}, {z1}) lies outside the volume's {n} slices along axis {axis}")
        slab = np.take(lab, np.arange(z0, z1), axis=axis)
        out.append(float((slab == component).sum()))
    return np.asarray(out)


def alpha_beta_from_fractions(anode_r1: float, anode_r2: float, anode_r3: float) -> tuple[float, float]:
    """``(α, β)`` = (anode in R2 / anode in R3, anode in R1 / anode in R3).

    Raises
    ------
    InputError
        No anode in R3 (the reference plane must contain it).
    """
    if anode_r3 <= 0:
        raise InputError("plane R3 contains no anode, so α and β (anode volume relative to R3) are undefined; "
                         "check the beam-plane positions against the CT volume")
    return float(anode_r2 / anode_r3), float(anode_r1 / anode_r3)
