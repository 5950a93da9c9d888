"""Adapter: memory -> method -> reputation gate -> deltas. Shared by the ROS adaptation node and
the offline evaluator, so it has no threads, clocks or ROS in it: the caller serialises calls.

State it keeps:
- a working copy of the source model that the method adapts;
- the *acknowledged* state: what the perception node serves (version `acked_version`). Deltas
  are always computed against it, and on acknowledgement it is advanced with exactly the same
  float32 arithmetic the ServedModel uses (state + delta), so both sides stay bit-identical
  without shipping full states;
- a mirror model holding the acknowledged state: the gate compares the candidate with it.

Decisions (ReputationGate): accept -> Proposal with a delta to the candidate; hold -> keep
training, nothing sent; rollback -> the working copy goes back to the acknowledged state;
reset -> the working copy goes back to source and a delta to the source is proposed (unless the
served state already is the source). While a proposal is outstanding (sent, not yet answered)
steps keep training but propose nothing.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .delta import ParameterDelta, compute_delta, sign
from .memory import LatentMemory
from .methods import make_method
from .model import SplitModel, adaptable_state, load_adaptable_state
from .reputation import Decision, ReputationGate
from .serving import DEFAULT_MAX_DELTA_NORM


@dataclass
class Proposal:
    delta: ParameterDelta
    decision: Decision


class Adapter:
    """See module docstring. `**hp` goes to the method (lr, optimizer, fisher_alpha, ...).

    memory_capacity: latents kept (default 512: 26 MB at the default tap of fmnist_cnn).
    holdout_fraction: share of incoming latents kept out of training for the gate (default 0.34:
        the gate scores the newest 16 held-out latents, which then span ~50 frames instead of
        ~80 at 0.2, so they show the current distribution; 'safe' + gate on the continual
        severity-5 stream: 60.8 % online at 0.2, 61.1 % at 0.34).
    sampling: how a step draws its training batch from the memory.
        'recent' (default): the newest `batch_size` training latents. Under drift this is what
        the published methods do (TENT/EATA/SAR adapt on the newest test batch): measured on the
        continual severity-5 stream (10 corruptions x 1000 frames, batches of 64, predict then
        adapt), uniform sampling from a 1024-latent memory (~800 frames of history) trained
        mostly on the *previous* corruption after every shift: norm 47.5 % / tent 48.9 % online
        vs 59.0 % / 60.2 % with 'recent' (together with min_momentum=1, see methods/base.py),
        and the worst 1000-frame window vs source went from -12.9 / -8.0 to -5.3 / -1.5 points.
        'uniform': uniformly without replacement from the whole memory (i.i.d.-like replay;
        useful with class_balanced=True on class-correlated streams).
    min_samples: training latents needed before the first step (default: batch_size).
    max_delta_norm: deltas above it are scaled down to it (an interpolation towards the
        candidate, so BN variances stay positive); keep it equal to the ServedModel's bound
        (both default to serving.DEFAULT_MAX_DELTA_NORM), None disables clipping.
    gate: True (default ReputationGate), False (accept everything) or a ReputationGate.
    """

    SAMPLING = ('recent', 'uniform')

    def __init__(self, source: SplitModel, method: str, memory_capacity: int = 512, batch_size: int = 64,
                 gate: bool | ReputationGate = True, class_balanced: bool = False, sampling: str = 'recent',
                 holdout_fraction: float = 0.34, min_samples: int | None = None, seed: int = 0,
                 max_delta_norm: float | None = DEFAULT_MAX_DELTA_NORM, hmac_key: bytes | None = None,
                 proposer: str = 'adapter', **hp):
        if sampling not in self.SAMPLING:
            raise ValueError(f'sampling must be one of {self.SAMPLING}, got {sampling!r}')
        if int(batch_size) < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.sampling = sampling
        self.method_name = method
        self.batch_size = int(batch_size)
        self.min_samples = int(min_samples if min_samples is not None else batch_size)
        self.max_delta_norm = max_delta_norm
        self.hmac_key = hmac_key
        self.proposer = proposer
        self.model = copy.deepcopy(source).eval()
        self.method = make_method(method, self.model, **hp)
        self.latent_shape = tuple(source.latent_shape)
        self.memory = LatentMemory(memory_capacity, class_balanced=class_balanced,
                                   holdout_fraction=holdout_fraction, seed=seed)
        if gate is True:
            self.gate: ReputationGate | None = ReputationGate()
        elif gate is False or gate is None:
            self.gate = None
        else:
            self.gate = gate
        self.source_state = adaptable_state(source)
        self.acked_state = {k: v.clone() for k, v in self.source_state.items()}
        self.acked_version = 0
        self.served_mirror = copy.deepcopy(source).eval()
        # the unadapted model, for the gate's source check ("is the source better here?")
        self.source_mirror = copy.deepcopy(source).eval()
        self.pending: ParameterDelta | None = None
        self.last_decision: Decision | None = None
        self.last_info: dict = {}
        self.last_refusal = ''
        self.last_seen_version = 0
        self.last_step_ms = 0.0
        self.counters = {
            'steps': 0, 'proposals': 0, 'accepted': 0, 'held': 0, 'rolled_back': 0, 'resets': 0,
            'acknowledged': 0, 'refused': 0, 'latents_received': 0, 'latents_dropped': 0,
            'unchanged': 0, 'clipped': 0, 'resyncs': 0, 'method_resets': 0,
        }

    # -- input ---------------------------------------------------------------------------------
    def ingest(self, latents, model_version: int, predicted_classes=None) -> int:
        """Add latents [N, *latent_shape] (or one [*latent_shape]) tagged with the served version.

        Wrong shapes drop the whole batch, rows with NaN/inf are dropped one by one; both counted.
        Returns the number of latents stored.
        """
        z = torch.as_tensor(latents)
        if z.dim() == len(self.latent_shape):
            z = z.unsqueeze(0)
        n = int(z.shape[0]) if z.dim() >= 1 else 1
        self.counters['latents_received'] += n
        if tuple(z.shape[1:]) != self.latent_shape or not (z.is_floating_point()):
            self.counters['latents_dropped'] += n
            return 0
        z = z.to(torch.float32)
        ok = torch.isfinite(z.reshape(n, -1)).all(1)
        if not bool(ok.all()):
            self.counters['latents_dropped'] += int((~ok).sum())
            z = z[ok]
            if predicted_classes is not None:
                predicted_classes = torch.as_tensor(predicted_classes).reshape(-1)[ok]
        if z.shape[0] == 0:
            return 0
        self.last_seen_version = max(self.last_seen_version, int(model_version))
        if self.memory.class_balanced:
            if predicted_classes is None:
                with torch.no_grad():
                    predicted_classes = self.model.classify(z).argmax(1)
            self.memory.add(z, predicted_classes)
        else:
            self.memory.add(z)
        return int(z.shape[0])

    @property
    def needs_resync(self) -> bool:
        """Latents arrived from a served version this adapter does not know (perception restarted,
        someone else applied a delta): the caller should fetch the served state and resync()."""
        expected = self.acked_version + (1 if self.pending is not None else 0)
        return self.last_seen_version > expected

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> Proposal | None:
        """One adaptation step on a memory batch; a Proposal when the gate lets a delta out."""
        if len(self.memory) < self.min_samples:
            return None
        t0 = time.perf_counter()
        if self.sampling == 'recent':
            batch = self.memory.recent(self.batch_size)
        else:
            batch = self.memory.sample(self.batch_size)
        self.last_info = self.method.step(batch)
        self.counters['steps'] += 1
        if self.last_info.get('reset'):
            self.counters['method_resets'] += 1
        try:
            if self.pending is not None or not self.method.adapts:
                return None
            return self._propose()
        finally:
            self.last_step_ms = (time.perf_counter() - t0) * 1e3

    def _propose(self) -> Proposal | None:
        if self.gate is None:
            decision = Decision('accept', 'gate disabled', 0.0)
        else:
            decision = self.gate.evaluate(self.model, self.served_mirror, self.memory.holdout(),
                                          source=self.source_mirror)
        self.last_decision = decision
        kind = decision.kind
        if kind == 'hold':
            self.counters['held'] += 1
            return None
        if kind == 'rollback':
            self.counters['rolled_back'] += 1
            self.method.adopt_state(self.acked_state)
            return None
        if kind == 'reset':
            self.counters['resets'] += 1
            self.method.reset()
        else:
            self.counters['accepted'] += 1
        delta = compute_delta(adaptable_state(self.model), self.acked_state, self.acked_version,
                              score=decision.score, proposer=self.proposer)
        norm = delta.norm()
        if norm == 0.0:
            self.counters['unchanged'] += 1
            return None
        if self.max_delta_norm is not None and norm > self.max_delta_norm:
            delta = delta.scaled(0.999 * self.max_delta_norm / norm)   # margin for float rounding
            self.counters['clipped'] += 1
        delta.meta['decision'] = kind
        if self.hmac_key:
            delta.signature = sign(delta, self.hmac_key)
        self.pending = delta
        self.counters['proposals'] += 1
        return Proposal(delta, decision)

    # -- answers from the perception side -------------------------------------------------------------
    def acknowledge(self, version: int) -> None:
        """The pending delta was applied; the served model is now `version`."""
        if self.pending is None:
            raise RuntimeError('acknowledge() without a pending proposal')
        new = {}
        for name, ref in self.acked_state.items():
            d = self.pending.tensors.get(name)
            # the very op ServedModel.validate uses (numpy float32 add): bit-identical result
            new[name] = ref.clone() if d is None else torch.from_numpy(ref.numpy() + d)
        self.acked_state = new
        self.acked_version = int(version)
        load_adaptable_state(self.served_mirror, new)
        self.pending = None
        self.counters['acknowledged'] += 1

    def refused(self, reason: str) -> None:
        """The pending delta was refused (or the call failed): forget it; the next accepted step
        proposes a fresh delta against the acknowledged state."""
        self.pending = None
        self.last_refusal = str(reason)
        self.counters['refused'] += 1

    def resync(self, version: int, state: dict) -> None:
        """Adopt the served state (after a restart or a version mismatch) as acknowledged AND working."""
        tensors = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v).to(torch.float32).clone()
                   for k, v in state.items()}
        load_adaptable_state(self.served_mirror, tensors)   # validates names/shapes/finite first
        self.method.adopt_state(tensors)
        self.acked_state = adaptable_state(self.served_mirror)
        self.acked_version = int(version)
        self.last_seen_version = int(version)
        self.pending = None
        self.counters['resyncs'] += 1

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict:
        """Counters and the last decision, in the AdaptationStatus message's vocabulary."""
        d = self.last_decision
        score = float(d.score) if d is not None and math.isfinite(d.score) else 0.0
        return {'method': self.method_name, 'served_version': self.acked_version,
                'memory_size': len(self.memory) + self.memory.holdout_size, **self.counters,
                'last_decision': d.kind if d else '', 'last_score': score,
                'last_reason': d.reason if d else '', 'step_ms': self.last_step_ms,
                'pending': self.pending is not None}
