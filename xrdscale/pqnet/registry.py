"""The model registry: one folder per trained PQ-Net ensemble at any fsspec URL.

Layout of an entry (``MODEL_URL``)::

    model.json              spec, q grid, normalisation, members (files, sha256, seed,
                            training curves), held-out test metrics, training config, id
    phases.yaml             the phase library the ensemble was trained on (verbatim)
    members/member_NNN.pt   torch state dict of each member
    members/member_NNN.onnx its ONNX export
    .xrdscale-complete      written last (storage.mark_complete), names the id

``metrics`` (from :func:`xrdscale.pqnet.train.train_ensemble`) holds ``n_test`` and, per
output ``PHASE.PARAM`` in ``outputs``, the network's held-out ``r2``, ``mae``, ``mean_std``
and ``n`` beside its Cramér–Rao ``r2_bound``, ``mae_bound`` (plus ``r2_crb``, ``n_bound``,
``crb_capped``), ``accepted`` and ``weakly_determined``; ``metrics["bounds"]`` says what the
bounds were computed on (None when skipped). Entries written before the bounds lack those
keys; :func:`xrdscale.pqnet.identifiability.bounds_table` reads either kind.

The id is a content hash: sha256 over the spec, the q grid, the phase library and the
checksums of every member file. Loading verifies the marker and every checksum, so a
partial or corrupted entry is refused with a message naming the bad file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xrdscale.exceptions import IncompleteStoreError, InputError, StorageError
from xrdscale.io import storage
from xrdscale.pqnet.model import ModelSpec, PQNet

logger = logging.getLogger(__name__)

FORMAT = 1
STAGE = "pqnet-model"


@dataclass(frozen=True)
class MemberFiles:
    """One trained member ready to be written: weights, ONNX export and its record."""

    state: bytes
    onnx: bytes
    info: dict[str, Any]


def state_bytes(model: PQNet) -> bytes:
    """Serialise a member's weights."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_id(spec: ModelSpec, q: np.ndarray, phases_yaml: str, checksums: list[str]) -> str:
    """The content-hash id of an entry."""
    h = hashlib.sha256()
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    h.update(np.asarray(q, dtype=np.float64).tobytes())
    h.update(phases_yaml.encode())
    for c in checksums:
        h.update(c.encode())
    return "pqnet-" + h.hexdigest()[:16]


def write_entry(url: str, *, spec: ModelSpec, q: np.ndarray, phases_yaml: str, members: list[MemberFiles],
                metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """Write a complete registry entry at ``url`` (marker last) and return its id.

    Parameters
    ----------
    url : str
        Destination folder (any fsspec URL); previous content is removed.
    spec : ModelSpec
        Architecture and normalisation shared by the members.
    q : numpy.ndarray
        The model's q grid (1/Å), length ``spec.npt``.
    phases_yaml : str
        Text of the phase library the training library was simulated from.
    members : list of MemberFiles
        Weights, ONNX export and record (seed, curves) of each member.
    metrics : dict
        Held-out test metrics.
    config : dict
        Training configuration (library URL, epochs, batch, lr, ...).

    Returns
    -------
    str
        The entry's id.
    """
    storage.begin_store(url)
    records = []
    checksums = []
    for i, m in enumerate(members):
        pt, ox = f"members/member_{i:03d}.pt", f"members/member_{i:03d}.onnx"
        storage.write_bytes(storage.join(url, pt), m.state)
        storage.write_bytes(storage.join(url, ox), m.onnx)
        rec = {"weights": pt, "weights_sha256": _sha(m.state), "onnx": ox, "onnx_sha256": _sha(m.onnx), **m.info}
        checksums += [rec["weights_sha256"], rec["onnx_sha256"]]
        records.append(rec)
    storage.write_bytes(storage.join(url, "phases.yaml"), phases_yaml.encode())
    entry_id = content_id(spec, q, phases_yaml, checksums)
    doc = {
        "format": FORMAT, "stage": STAGE, "id": entry_id, "spec": spec.to_dict(),
        "q": [float(v) for v in np.asarray(q)], "normalisation": {
            "input": "divide each pattern by its mean intensity",
            "targets": "standardised with target_mean/target_std; scale outputs multiplied back by the mean",
        },
        "members": records, "metrics": metrics, "config": config,
        "provenance": storage.provenance(STAGE, config),
    }
    storage.write_bytes(storage.join(url, "model.json"), json.dumps(doc, indent=1, default=float).encode())
    storage.mark_complete(url, {"stage": STAGE, "id": entry_id})
    logger.info("wrote model %s with %d members to %s", entry_id, len(members), storage.redact(url))
    return entry_id


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry opened for reading (member files are read and verified on demand)."""

    url: str
    id: str
    spec: ModelSpec
    q: np.ndarray
    phases_yaml: str
    members: list[dict[str, Any]]
    metrics: dict[str, Any]
    config: dict[str, Any]

    def _read_verified(self, rel: str, sha: str) -> bytes:
        url = storage.join(self.url, rel)
        try:
            data = storage.read_bytes(url)
        except StorageError as exc:
            raise InputError(f"model {storage.redact(self.url)} is corrupt: member file {rel} is missing "
                             f"({exc}); retrain or copy the entry again") from exc
        if _sha(data) != sha:
            raise InputError(f"model {storage.redact(self.url)} is corrupt: {rel} does not match its sha256 "
                             "in model.json; retrain or copy the entry again")
        return data

    def load_member(self, i: int) -> PQNet:
        """Member ``i`` as a torch module in eval mode."""
        rec = self.members[i]
        data = self._read_verified(rec["weights"], rec["weights_sha256"])
        model = PQNet(self.spec)
        try:
            model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        except Exception as exc:  # torch raises RuntimeError/UnpicklingError/KeyError for bad files
            raise InputError(f"model {storage.redact(self.url)}: {rec['weights']} cannot be loaded ({exc}); "
                             "retrain the model") from exc
        return model.eval()

    def verify(self) -> None:
        """Check every member file against its checksum and that its weights load."""
        for i, rec in enumerate(self.members):
            self.load_member(i)
            self._read_verified(rec["onnx"], rec["onnx_sha256"])

    def load_onnx(self, i: int) -> bytes:
        """The verified ONNX export of member ``i``."""
        rec = self.members[i]
        return self._read_verified(rec["onnx"], rec["onnx_sha256"])


def open_entry(url: str) -> ModelEntry:
    """Open the registry entry at ``url``.

    Raises
    ------
    StorageError
        Nothing at ``url``.
    IncompleteStoreError
        The entry was never completed (training interrupted or failed).
    InputError
        ``model.json`` is missing or malformed.
    """
    if not storage.exists(url):
        raise StorageError(f"no model at {storage.redact(url)}; check the URL or train one with "
                           "'xrdscale pqnet train'")
    if not storage.is_complete(url):
        raise IncompleteStoreError(f"model {storage.redact(url)} is a partial registry entry (no "
                                   f"{storage.MARKER} marker): its training was interrupted; train it again")
    try:
        doc = json.loads(storage.read_bytes(storage.join(url, "model.json")))
        if doc.get("format") != FORMAT or doc.get("stage") != STAGE:
            raise ValueError(f"format {doc.get('format')!r} / stage {doc.get('stage')!r}, "
                             f"expected format {FORMAT} of a {STAGE!r}")
        spec = ModelSpec.from_dict(doc["spec"])
        q = np.asarray(doc["q"], dtype=np.float64)
        if q.shape != (spec.npt,):
            raise ValueError(f"q grid has {q.size} points but the network takes {spec.npt}")
        members = list(doc["members"])
        if not members:
            raise ValueError("no members")
        phases_yaml = storage.read_bytes(storage.join(url, "phases.yaml")).decode()
    except (StorageError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"model {storage.redact(url)} is not a valid registry entry: {exc}; "
                         "retrain the model or point at a folder written by 'xrdscale pqnet train'") from exc
    return ModelEntry(url=url, id=doc["id"], spec=spec, q=q, phases_yaml=phases_yaml, members=members,
                      metrics=doc.get("metrics", {}), config=doc.get("config", {}))
