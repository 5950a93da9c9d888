"""ServedModel: the perception side's model — versioned, validated, all-or-nothing updates.

Perception must never wait for learning and must never run on a half-updated model. So `apply`
validates a delta completely (signature, replay, base version, names, shapes, finite values, L2
norm, resulting BN variances) before it touches anything, builds the new tensors off to the side,
and only then copies them in under a lock that `predict` holds just for the head's forward pass.
Any refusal leaves the weights byte-identical and says exactly why.

Versions: 0 is the source model; every accepted delta, rollback or reset creates version + 1.
Versions never go back, so a number always names one state, and a delta computed against an old
state can never be applied to a different state that happens to reuse its number. A bounded
history of accepted states allows `rollback(to_version)`.
"""
from __future__ import annotations

import collections
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_torch_save
from .delta import ParameterDelta, verify
from .model import SplitModel, adaptable_state

CHECKPOINT_FORMAT = 'async_ttt_ros.served_model/1'
DEFAULT_MAX_DELTA_NORM = 1000.0


@dataclass
class ApplyResult:
    accepted: bool
    version: int
    reason: str


class ServedModel:
    """Wraps the perception model (`model` is used in place, kept in eval mode).

    max_delta_norm: largest L2 norm of an accepted delta (over all values). The default is
        generous because BN running variances of early layers legitimately move by tens under
        severe corruption (the first norm delta on severe gaussian noise measured 35 on fmnist_cnn); it is a guard
        against garbage, not a step-size limit.
    allowed_names: adaptable entries a delta may touch (default: all of adaptable_state).
    hmac_key: when set, every delta must carry a valid HMAC-SHA256 signature.
    history: number of accepted states kept for rollback.
    recent_ids: number of delta ids remembered to refuse replays.
    """

    def __init__(self, model: SplitModel, max_delta_norm: float = DEFAULT_MAX_DELTA_NORM,
                 allowed_names=None, hmac_key: bytes | None = None, history: int = 16,
                 recent_ids: int = 4096):
        if not (max_delta_norm > 0 and math.isfinite(max_delta_norm)):
            raise ValueError(f'max_delta_norm must be a positive finite number, got {max_delta_norm}')
        if history < 1:
            raise ValueError(f'history must be >= 1, got {history}')
        self.model = model.eval()
        self.max_delta_norm = float(max_delta_norm)
        self.hmac_key = bytes(hmac_key) if hmac_key else None
        self._refs = self._tensor_refs()
        # numpy views sharing memory with the live tensors (read-only use), and expected shapes
        self._refs_np = {k: v.detach().numpy() for k, v in self._refs.items()}
        self._shapes = {k: tuple(v.shape) for k, v in self._refs.items()}
        known = set(self._refs)
        if allowed_names is None:
            self.allowed_names = frozenset(known)
        else:
            unknown = sorted(set(allowed_names) - known)
            if unknown:
                raise ValueError(f'allowed_names not in the adaptable state: {unknown}')
            self.allowed_names = frozenset(allowed_names)
        self._swap_lock = threading.Lock()     # held by predict (head forward) and the swap
        self._apply_lock = threading.Lock()    # serialises apply/rollback/reset/load
        self.version = 0
        self._source = self._snapshot()
        self._history: collections.OrderedDict[int, dict[str, Tensor]] = collections.OrderedDict()
        self._history_len = int(history)
        self._history[0] = self._source
        self._recent_ids: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._recent_len = int(recent_ids)
        self.last_apply_s = 0.0     # whole apply (validation + swap), seconds
        self.last_swap_s = 0.0      # time predict() could have been blocked by the swap
        self.counts = {'accepted': 0, 'refused': 0, 'rollbacks': 0, 'resets': 0}

    # -- internals -----------------------------------------------------------------------------
    def _tensor_refs(self) -> dict[str, Tensor]:
        """name -> the live tensor in the head (the objects the swap writes into)."""
        live = self.model.head.state_dict(keep_vars=True)
        refs = {}
        for name in adaptable_state(self.model):
            t = live[name]
            refs[name] = t.data if isinstance(t, torch.nn.Parameter) else t
        return refs

    def _snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._refs.items()}

    def _swap_in(self, new: dict[str, Tensor], version: int) -> None:
        """Copy prepared tensors into the model and bump the version, atomically for predict()."""
        t0 = time.perf_counter()
        with self._swap_lock, torch.no_grad():
            for name, value in new.items():
                self._refs[name].copy_(value)
            self.version = version
        self.last_swap_s = time.perf_counter() - t0

    def _remember(self, version: int, state: dict[str, Tensor]) -> None:
        self._history[version] = state
        while len(self._history) > self._history_len:
            self._history.popitem(last=False)

    def _refuse(self, reason: str) -> ApplyResult:
        self.counts['refused'] += 1
        return ApplyResult(False, self.version, reason)

    # -- inference -----------------------------------------------------------------------------
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, latents) for a batch of preprocessed images."""
        logits, latents, _ = self.predict_versioned(x)
        return logits, latents

    def predict_versioned(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """(logits, latents, version): the version is the one the logits were computed with."""
        with torch.inference_mode():
            z = self.model.features(x)          # frozen stem: no lock needed
            with self._swap_lock:
                logits = self.model.classify(z)
                version = self.version
        return logits, z, version

    def classify(self, latents: Tensor) -> tuple[Tensor, int]:
        """(logits, version) from latents (used when the stem ran elsewhere)."""
        with torch.inference_mode(), self._swap_lock:
            return self.model.classify(latents), self.version

    # -- updates -------------------------------------------------------------------------------
    def validate(self, delta: ParameterDelta) -> tuple[str, dict[str, Tensor] | None]:
        """('', new tensors) when `delta` may be applied now, else (reason, None). Pure."""
        if not isinstance(delta, ParameterDelta):
            return f'not a ParameterDelta: {type(delta).__name__}', None
        if not isinstance(delta.delta_id, str) or not delta.delta_id:
            return 'delta_id is empty', None
        if self.hmac_key is not None:
            if not delta.signature:
                return 'missing signature (this model requires HMAC-SHA256 signed deltas)', None
            if not verify(delta, self.hmac_key):
                return 'bad signature (HMAC-SHA256 does not match the payload)', None
        if delta.delta_id in self._recent_ids:
            return (f'replayed delta_id {delta.delta_id!r} (already applied as version '
                    f'{self._recent_ids[delta.delta_id]})'), None
        if delta.base_version != self.version:
            kind = 'stale' if delta.base_version < self.version else 'future'
            return (f'{kind} base_version {delta.base_version}: served version is {self.version}'), None
        if not delta.tensors:
            return 'delta has no tensors', None
        unknown = sorted(set(delta.tensors) - set(self._refs))
        if unknown:
            return f'unknown parameter names {unknown}', None
        forbidden = sorted(set(delta.tensors) - self.allowed_names)
        if forbidden:
            return f'parameters not allowed to change: {forbidden}', None
        # numpy throughout: a handful of small tensors, where per-op torch overhead would dominate
        arrays = {}
        for name, value in delta.tensors.items():
            arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            if arr.dtype != np.float32:
                if not np.issubdtype(arr.dtype, np.floating):
                    return f'{name}: dtype {arr.dtype} is not floating point', None
                arr = arr.astype(np.float32)
            if arr.shape != self._shapes[name]:
                return f'{name}: shape {tuple(arr.shape)} does not match {self._shapes[name]}', None
            arrays[name] = arr
        flat = np.concatenate([a.ravel() for a in arrays.values()])
        if not np.isfinite(flat).all():
            for name, arr in arrays.items():
                if not np.isfinite(arr).all():
                    bad = int((~np.isfinite(arr)).sum())
                    return f'{name}: {bad} non-finite value(s) (NaN/inf)', None
        flat64 = flat.astype(np.float64)
        norm = math.sqrt(float(np.dot(flat64, flat64)))
        if norm > self.max_delta_norm:
            return f'delta L2 norm {norm:.4g} exceeds the bound {self.max_delta_norm:.4g}', None
        new = {}
        for name, arr in arrays.items():
            value = self._refs_np[name] + arr          # a new array: the model is not touched
            if name.endswith('running_var'):
                if not (value > 0).all():
                    return f'{name}: update makes a BatchNorm running variance <= 0', None
            elif not np.isfinite(value).all():
                return f'{name}: result of the update is not finite', None
            new[name] = torch.from_numpy(value)
        return '', new

    def apply(self, delta: ParameterDelta) -> ApplyResult:
        """Validate everything, then swap all tensors in at once; otherwise change nothing."""
        t0 = time.perf_counter()
        with self._apply_lock:
            reason, new = self.validate(delta)
            if reason:
                return self._refuse(reason)
            version = self.version + 1
            self._swap_in(new, version)
            self._recent_ids[delta.delta_id] = version
            while len(self._recent_ids) > self._recent_len:
                self._recent_ids.popitem(last=False)
            # history keeps full states; untouched entries are shared with the previous one
            prev = self._history.get(version - 1) or self._snapshot()
            self._remember(version, {**prev, **new})
            self.counts['accepted'] += 1
        self.last_apply_s = time.perf_counter() - t0
        return ApplyResult(True, version, f'applied {delta.delta_id} on version {delta.base_version} '
                                          f'({len(new)} tensors)')

    def _load_full(self, state: dict[str, Tensor], note: str) -> ApplyResult:
        with self._apply_lock:
            version = self.version + 1
            self._swap_in(state, version)
            self._remember(version, state)
        return ApplyResult(True, version, note)

    def rollback(self, to_version: int) -> ApplyResult:
        """Serve the state of an earlier version again (as a new version number)."""
        state = self._history.get(int(to_version))
        if state is None:
            self.counts['refused'] += 1
            return ApplyResult(False, self.version, f'version {to_version} is not in the history '
                                                    f'(kept: {list(self._history)})')
        self.counts['rollbacks'] += 1
        return self._load_full(state, f'rolled back to the state of version {to_version}')

    def reset_to_source(self) -> ApplyResult:
        self.counts['resets'] += 1
        return self._load_full(self._source, 'reset to the source model (state of version 0)')

    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """(version, adaptable state as float32 numpy arrays), consistent with each other."""
        with self._swap_lock:
            return self.version, {k: v.detach().cpu().numpy().copy() for k, v in self._refs.items()}

    def history_versions(self) -> list[int]:
        return list(self._history)

    # -- persistence -----------------------------------------------------------------------------
    def save_checkpoint(self, path) -> Path:
        """Atomic write (temporary file in the same directory + os.replace). Thread-safe: may run
        on a writer thread while deltas are applied."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._apply_lock:   # version, state and replay ids from one moment; the write is outside
            version, state = self.state()
            recent_ids = list(self._recent_ids)
        payload = {'format': CHECKPOINT_FORMAT, 'version': version, 'arch': self.model.arch,
                   'tap': self.model.tap, 'state': {k: torch.from_numpy(v) for k, v in state.items()},
                   'recent_ids': recent_ids}
        return atomic_torch_save(payload, path)

    def load_checkpoint(self, path) -> ApplyResult:
        """Restore version and state saved by save_checkpoint; validated before anything changes."""
        try:
            payload = torch.load(Path(path), map_location='cpu', weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same refusal
            return ApplyResult(False, self.version, f'cannot read checkpoint {path}: {exc}')
        if not isinstance(payload, dict) or payload.get('format') != CHECKPOINT_FORMAT:
            return ApplyResult(False, self.version, f'{path}: not a served-model checkpoint')
        if payload.get('arch') != self.model.arch:
            return ApplyResult(False, self.version, f"{path}: arch {payload.get('arch')!r} != {self.model.arch!r}")
        state = payload.get('state', {})
        if set(state) != set(self._refs):
            return ApplyResult(False, self.version, f'{path}: adaptable entries do not match the model '
                                                    f'(missing {sorted(set(self._refs) - set(state))}, '
                                                    f'unexpected {sorted(set(state) - set(self._refs))})')
        new = {}
        for name, ref in self._refs.items():
            value = torch.as_tensor(state[name]).to(ref.dtype)
            if tuple(value.shape) != tuple(ref.shape) or not torch.isfinite(value).all():
                return ApplyResult(False, self.version, f'{path}: {name} has a wrong shape or non-finite values')
            new[name] = value.clone()
        with self._apply_lock:
            version = int(payload['version'])
            self._swap_in(new, version)
            self._history.clear()
            self._history[0] = self._source
            self._remember(version, new)
            self._recent_ids = collections.OrderedDict((i, version) for i in payload.get('recent_ids', []))
        return ApplyResult(True, version, f'loaded checkpoint {path} at version {version}')
