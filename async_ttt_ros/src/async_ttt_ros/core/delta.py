"""Parameter deltas: what the adapter sends to the perception node instead of a model.

A delta is additive (served_new = served + delta) and always float32, so the adapter can mirror
the perception node's arithmetic bit for bit and both sides agree on the served state without
shipping it. The wire form (`flatten`/`unflatten`) matches the ApplyParameterDelta service:
names[], ranks[] (one per tensor), dims[] (all shapes concatenated), values[] (all tensors,
C order, concatenated). `sign`/`verify` authenticate a delta with HMAC-SHA256 over a canonical
byte payload that does not depend on dict order.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import struct
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

_PAYLOAD_TAG = b'async_ttt_ros/delta/v1\x00'


class DeltaFormatError(ValueError):
    """The wire form of a delta is inconsistent (names/ranks/dims/values do not fit together)."""


@dataclass
class ParameterDelta:
    """An additive update of named float32 tensors, valid only on top of `base_version`."""
    delta_id: str
    base_version: int
    tensors: dict[str, np.ndarray]
    score: float = 0.0
    proposer: str = ''
    signature: bytes = b''
    meta: dict = field(default_factory=dict)   # local only (e.g. decision kind); never on the wire

    def norm(self) -> float:
        """L2 norm over all values (float64 accumulation)."""
        return math.sqrt(sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64)))
                             for v in self.tensors.values()))

    def numel(self) -> int:
        return int(sum(v.size for v in self.tensors.values()))

    def scaled(self, factor: float) -> 'ParameterDelta':
        """Same id/base with every value multiplied by `factor` (signature dropped)."""
        return ParameterDelta(self.delta_id, self.base_version,
                              {k: (v * np.float32(factor)).astype(np.float32) for k, v in self.tensors.items()},
                              self.score, self.proposer, b'', dict(self.meta))

    @classmethod
    def from_wire(cls, delta_id: str, base_version: int, names: Sequence[str], ranks: Sequence[int],
                  dims: Sequence[int], values, score: float = 0.0, proposer: str = '',
                  signature: bytes = b'') -> 'ParameterDelta':
        """Build a delta from the service fields; raises DeltaFormatError when they do not fit."""
        return cls(str(delta_id), int(base_version), unflatten(names, ranks, dims, values),
                   float(score), str(proposer), bytes(signature))


def _as_float32_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _is_float(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def new_delta_id() -> str:
    return uuid.uuid4().hex


def compute_delta(new_state: Mapping[str, object], base_state: Mapping[str, object], base_version: int,
                  delta_id: str | None = None, score: float = 0.0, proposer: str = '',
                  names: Sequence[str] | None = None) -> ParameterDelta:
    """delta = new - base, in float32, for every floating-point entry of `base_state`.

    `names` restricts the delta to a subset. Integer entries (e.g. BN's num_batches_tracked) are
    skipped: they are counters, not something an additive float delta can carry.
    """
    keys = list(base_state) if names is None else list(names)
    missing = [k for k in keys if k not in new_state or k not in base_state]
    if missing:
        raise KeyError(f'compute_delta: entries missing from new or base state: {missing}')
    tensors: dict[str, np.ndarray] = {}
    for k in keys:
        base_raw, new_raw = base_state[k], new_state[k]
        if not _is_float(base_raw):
            continue
        base = _as_float32_numpy(base_raw)
        new = _as_float32_numpy(new_raw)
        if base.shape != new.shape:
            raise ValueError(f'compute_delta: {k}: new shape {new.shape} != base shape {base.shape}')
        tensors[k] = np.ascontiguousarray(new - base, dtype=np.float32)
    return ParameterDelta(delta_id or new_delta_id(), int(base_version), tensors, float(score), proposer)


def flatten(delta: ParameterDelta) -> tuple[list[str], list[int], list[int], np.ndarray]:
    """Wire form: (names, ranks, dims, values float32 1-D), names in the delta's order."""
    names, ranks, dims, chunks = [], [], [], []
    for name, value in delta.tensors.items():
        arr = _as_float32_numpy(value)
        names.append(name)
        ranks.append(arr.ndim)
        dims.extend(int(d) for d in arr.shape)
        chunks.append(arr.ravel())
    values = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return names, ranks, dims, values.astype(np.float32, copy=False)


def unflatten(names: Sequence[str], ranks: Sequence[int], dims: Sequence[int], values) -> dict[str, np.ndarray]:
    """Inverse of `flatten`. Raises DeltaFormatError with the exact inconsistency found."""
    names = list(names)
    ranks = [int(r) for r in ranks]
    dims = [int(d) for d in dims]
    values = np.asarray(values, dtype=np.float32).ravel()
    if len(names) != len(ranks):
        raise DeltaFormatError(f'{len(names)} names but {len(ranks)} ranks (need one rank per name)')
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DeltaFormatError(f'duplicate names: {dup}')
    for i, (n, r) in enumerate(zip(names, ranks)):
        if not isinstance(n, str) or not n:
            raise DeltaFormatError(f'name #{i} is empty or not a string: {n!r}')
        if r < 0:
            raise DeltaFormatError(f'{n}: negative rank {r}')
    if sum(ranks) != len(dims):
        raise DeltaFormatError(f'ranks sum to {sum(ranks)} but {len(dims)} dims were given')
    if any(d < 0 for d in dims):
        raise DeltaFormatError(f'negative dimension in dims {dims}')
    shapes, pos = [], 0
    for r in ranks:
        shapes.append(tuple(dims[pos:pos + r]))
        pos += r
    sizes = [int(np.prod(s)) if s else 1 for s in shapes]
    if sum(sizes) != values.size:
        raise DeltaFormatError(f'shapes need {sum(sizes)} values in total but {values.size} were given '
                               f'(shapes: {dict(zip(names, shapes))})')
    out, pos = {}, 0
    for n, s, size in zip(names, shapes, sizes):
        out[n] = values[pos:pos + size].reshape(s).copy()
        pos += size
    return out


def canonical_payload(delta: ParameterDelta) -> bytes:
    """Bytes that the signature covers: id, base version, and (name, shape, values) sorted by name.

    Every variable-length field is length-prefixed so no two different deltas share a payload.
    """
    parts = [_PAYLOAD_TAG]
    did = delta.delta_id.encode('utf-8')
    parts.append(struct.pack('>I', len(did)) + did)
    parts.append(struct.pack('>q', int(delta.base_version)))
    parts.append(struct.pack('>I', len(delta.tensors)))
    for name in sorted(delta.tensors):
        arr = _as_float32_numpy(delta.tensors[name])
        nb = name.encode('utf-8')
        parts.append(struct.pack('>I', len(nb)) + nb)
        parts.append(struct.pack('>I', arr.ndim) + b''.join(struct.pack('>q', int(d)) for d in arr.shape))
        data = np.ascontiguousarray(arr, dtype='<f4').tobytes()
        parts.append(struct.pack('>Q', len(data)) + data)
    return b''.join(parts)


def sign(delta: ParameterDelta, key: bytes) -> bytes:
    """HMAC-SHA256 of the canonical payload (does not modify `delta`)."""
    if not key:
        raise ValueError('sign: empty HMAC key')
    return hmac.new(bytes(key), canonical_payload(delta), hashlib.sha256).digest()


def verify(delta: ParameterDelta, key: bytes) -> bool:
    """True when `delta.signature` is the HMAC of its payload under `key` (constant-time compare)."""
    if not key or not delta.signature:
        return False
    return hmac.compare_digest(sign(delta, key), bytes(delta.signature))
