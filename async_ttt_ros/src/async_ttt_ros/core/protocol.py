"""Realistic online evaluation of test-time adaptation (modes none / sync / async).

Protocol after Alfarra et al., ICML 2024 ("Evaluation of test-time adaptation under
computational time constraints"): frames arrive at a fixed rate and a method slower than the
stream cannot stop it. Here frames arrive one at a time (a camera), at `rate_hz`.

Why a *virtual* clock driven by *measured* compute: wall-clock runs on a shared 2-core machine
are neither reproducible nor comparable across methods, while a purely nominal cost model would
be dishonest. So every real forward pass, adaptation step, ingest and parameter apply is timed
with `time.perf_counter()` (or, `clock='cpu'`, with the thread's CPU time, which a shared machine
cannot inflate) and that measured duration advances a virtual timeline. Which frames
are late or dropped therefore depends on real costs, but the run itself never sleeps (a 100k-frame
stream at 30 Hz takes as long as its compute, not 55 minutes).

Modes
-----
none   every frame is predicted by the served (source) model. The predictor is busy for the
       measured forward time of each frame.
sync   the classic TTA loop on one compute: predict a frame, hand its latents to the adapter and
       every `adapt_every` predicted frames run the adaptation step inline and apply its delta at
       once. The predictor is busy for forward + ingest + step + apply.
async  the predictor only predicts (always with the latest *applied* model, `ServedModel`); the
       `Adapter` runs on its own compute and its own virtual timeline: a step starts as soon as
       the adapter is free and `min_new` new latents were published (default one batch, i.e. the
       same number of updates as sync when the adapter keeps up), or on the ticks of a timer
       at `adapt_rate_hz`. It ingests the latents published up to the step's start; its
       proposal is applied through `ServedModel.apply` (validation, versions, gate decisions)
       at the first frame that starts after the step completes: the real lag. The apply runs
       between frames on the predictor and costs predictor time. One proposal at a time is in
       flight (`max_in_flight`), like a pending service call.

Arrivals while the predictor is busy (any mode): a queue of `queue_size` frames (default 1, like
SensorDataQoS keep-last-1) holds the newest frame, which is predicted late (its latency counted);
a frame pushed out of the queue, or arriving with no queue, is DROPPED and counted. Never is a
frame silently waited for. As in Alfarra et al., a dropped frame is still scored, with the
prediction of the latest applied model at the moment it is dropped (that forward is not charged
to any timeline); `accuracy_predicted` (dropped frames excluded) and `accuracy_strict` (dropped
frames counted wrong) are reported as well.
"""
from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

MODES = ('none', 'sync', 'async')
# decision kind -> Adapter.counters key
_DECISION_COUNTERS = (('accept', 'accepted'), ('hold', 'held'), ('rollback', 'rolled_back'),
                      ('reset', 'resets'))
CLOCKS = {'wall': time.perf_counter, 'cpu': time.thread_time}
_READ_BATCH = 256   # frames fetched from the stream at a time (generation is not timed)

# A method spec may carry the reputation gate explicitly: 'tent+rep' (gate on), 'safe-rep' (off).
GATE_ON, GATE_OFF = '+rep', '-rep'


@dataclass
class ProtocolConfig:
    """Knobs of one evaluation run (all times in seconds on the virtual clock)."""

    rate_hz: float = 30.0              # frame arrival rate
    batch_size: int = 64               # frames per adaptation step (adapter batch)
    adapt_every: int | None = None     # sync: one update every k predicted frames (None: batch_size)
    adapt_rate_hz: float = 0.0         # async: adapter timer (steps/s); 0 = as soon as free + data
    queue_size: int = 1                # frames waiting for a busy predictor (0: drop at once)
    max_in_flight: int = 1             # async: proposals sent but not yet applied/refused
    min_new: int | None = None         # async: new latents needed to start a step
                                       # (None: batch_size back to back, 1 with a timer)
    window: int = 1000                 # frames per accuracy window
    memory_capacity: int | None = None  # Adapter memory (None: the Adapter's default)
    max_delta_norm: float | None = None  # ServedModel's bound on a delta (None: its default)
    # Fixed virtual costs (seconds) instead of measured ones, keys forward/ingest/step/apply.
    # For deterministic tests and what-if studies only; measured costs are the default and are
    # always recorded in the result either way.
    fixed_costs: Mapping[str, float] | None = None
    # 'wall': time.perf_counter (default; what a robot sees, including preemption by other
    # processes). 'cpu': time.thread_time, CPU time of this thread only: robust to a shared,
    # oversubscribed machine, exact for torch with one thread.
    clock: str = 'wall'

    def validate(self) -> None:
        if not (self.rate_hz > 0 and math.isfinite(self.rate_hz)):
            raise ValueError(f'rate_hz must be a positive number, not {self.rate_hz}')
        if self.batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, not {self.batch_size}')
        if self.adapt_every is not None and self.adapt_every < 1:
            raise ValueError(f'adapt_every must be >= 1, not {self.adapt_every}')
        if self.adapt_rate_hz < 0 or not math.isfinite(self.adapt_rate_hz):
            raise ValueError(f'adapt_rate_hz must be >= 0 (0: back to back), not {self.adapt_rate_hz}')
        if self.queue_size not in (0, 1):
            raise ValueError(f'queue_size must be 0 or 1 (keep-last-1), not {self.queue_size}')
        if self.max_in_flight < 1:
            raise ValueError(f'max_in_flight must be >= 1, not {self.max_in_flight}')
        if self.min_new is not None and self.min_new < 1:
            raise ValueError(f'min_new must be >= 1, not {self.min_new}')
        if self.window < 1:
            raise ValueError(f'window must be >= 1, not {self.window}')
        if self.clock not in CLOCKS:
            raise ValueError(f'clock must be one of {sorted(CLOCKS)}, not {self.clock!r}')
        if self.fixed_costs is not None:
            unknown = set(self.fixed_costs) - {'forward', 'ingest', 'step', 'apply'}
            if unknown:
                raise ValueError(f'fixed_costs: unknown keys {sorted(unknown)}')
            if any(v < 0 for v in self.fixed_costs.values()):
                raise ValueError('fixed_costs must be >= 0')

    def effective_min_new(self) -> int:
        if self.min_new is not None:
            return self.min_new
        return 1 if self.adapt_rate_hz > 0 else self.batch_size

    def to_dict(self) -> dict:
        return {'rate_hz': self.rate_hz, 'batch_size': self.batch_size,
                'adapt_every': self.adapt_every or self.batch_size,
                'adapt_rate_hz': self.adapt_rate_hz, 'queue_size': self.queue_size,
                'max_in_flight': self.max_in_flight, 'min_new': self.effective_min_new(),
                'window': self.window,
                'memory_capacity': self.memory_capacity, 'max_delta_norm': self.max_delta_norm,
                'fixed_costs': dict(self.fixed_costs) if self.fixed_costs else None,
                'clock': 'virtual, fixed costs' if self.fixed_costs else
                         f'virtual, measured with time.{CLOCKS[self.clock].__name__}',
                'dropped_frames_scored_with': 'latest applied model at drop time'}


def parse_method_spec(spec: str) -> tuple[str, bool | None]:
    """'tent' -> ('tent', None); 'tent+rep' -> ('tent', True); 'safe-rep' -> ('safe', False)."""
    spec = spec.strip()
    if spec.endswith(GATE_ON):
        return spec[:-len(GATE_ON)], True
    if spec.endswith(GATE_OFF):
        return spec[:-len(GATE_OFF)], False
    return spec, None


def default_gate(method: str) -> bool:
    """Classic methods run as published (no gate); 'safe' is the method with the reputation gate."""
    return method == 'safe'


# ----------------------------------------------------------------------------------------------
# results

@dataclass
class RunResult:
    """Everything one (method, mode) run measured; `to_dict()` is its JSON summary."""

    name: str
    method: str
    mode: str
    gate: bool
    config: dict
    correct: np.ndarray          # bool [N]: frame scored correct (dropped: latest-model prediction)
    predicted: np.ndarray        # bool [N]: frame got a real prediction (not dropped)
    late: np.ndarray             # bool [N]: waited in the queue before being predicted
    latency_s: np.ndarray        # float [N]: arrival -> prediction done (NaN for dropped)
    version: np.ndarray          # int [N]: served model version that scored the frame
    corruption: list[str]
    severity: np.ndarray
    window: int
    compute_s: dict = field(default_factory=dict)      # measured seconds by kind
    counts: dict = field(default_factory=dict)         # steps, proposals, applied, refused, ...
    decisions: dict = field(default_factory=dict)      # gate verdict kind -> count
    refusals: dict = field(default_factory=dict)       # ServedModel refusal reason -> count
    applied_versions: list = field(default_factory=list)
    apply_lag_s: list = field(default_factory=list)    # step done -> applied (virtual)
    wall_s: float = 0.0
    virtual_s: float = 0.0
    adapter_info: dict = field(default_factory=dict)

    # -- derived metrics
    @property
    def n(self) -> int:
        return int(len(self.correct))

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.n else float('nan')

    @property
    def accuracy_predicted(self) -> float:
        m = self.predicted
        return float(self.correct[m].mean()) if m.any() else float('nan')

    @property
    def accuracy_strict(self) -> float:
        return float((self.correct & self.predicted).mean()) if self.n else float('nan')

    def window_accuracy(self) -> np.ndarray:
        return window_means(self.correct, self.window)

    def segment_accuracy(self) -> list[dict]:
        out = []
        for seg in segments_from_labels(self.corruption, self.severity):
            sl = slice(seg['start'], seg['end'])
            out.append({**seg, 'accuracy': float(self.correct[sl].mean())})
        return out

    def to_dict(self) -> dict:
        lat = self.latency_s[np.isfinite(self.latency_s)] * 1e3
        n = max(1, self.n)
        wins = self.window_accuracy()
        total_compute = sum(self.compute_s.get(k, 0.0) for k in ('forward', 'ingest', 'step', 'apply'))
        predictor = self.compute_s.get('forward', 0.0) + self.compute_s.get('apply', 0.0)
        adapter = self.compute_s.get('ingest', 0.0) + self.compute_s.get('step', 0.0)
        if self.mode == 'sync':   # everything runs on the predictor
            predictor, adapter = total_compute, 0.0
        return {
            'name': self.name, 'method': self.method, 'mode': self.mode, 'gate': self.gate,
            'accuracy': self.accuracy,
            'accuracy_predicted': self.accuracy_predicted,
            'accuracy_strict': self.accuracy_strict,
            'frames': {'total': self.n, 'predicted': int(self.predicted.sum()),
                       'on_time': int((self.predicted & ~self.late).sum()),
                       'late': int(self.late.sum()), 'dropped': int((~self.predicted).sum())},
            'updates': dict(self.counts),
            'decisions': dict(self.decisions),
            'refusals': dict(self.refusals),
            'final_version': int(self.version[-1]) if self.n else 0,
            'versions_applied': len(self.applied_versions),
            'latency_ms': _stats(lat),
            'apply_lag_ms': _stats(np.asarray(self.apply_lag_s) * 1e3),
            'compute_ms_per_frame': {'predictor': predictor * 1e3 / n, 'adapter': adapter * 1e3 / n,
                                     'total': total_compute * 1e3 / n},
            'compute_s': {k: float(v) for k, v in self.compute_s.items()},
            'windows': {'size': self.window, 'accuracy': [float(a) for a in wins],
                        'min': float(wins.min()) if len(wins) else float('nan')},
            'segments': self.segment_accuracy(),
            'virtual_s': self.virtual_s, 'wall_s': self.wall_s,
            'adapter': self.adapter_info,
            'config': self.config,
        }


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {'p50': None, 'p99': None, 'mean': None, 'max': None, 'n': 0}
    return {'p50': float(np.percentile(values, 50)), 'p99': float(np.percentile(values, 99)),
            'mean': float(values.mean()), 'max': float(values.max()), 'n': int(values.size)}


def window_means(correct: np.ndarray, window: int) -> np.ndarray:
    """Mean of consecutive windows of `window` frames; a trailing partial window is kept when it
    holds at least half a window (a 3-frame tail would be pure noise)."""
    correct = np.asarray(correct, dtype=float)
    out = []
    for start in range(0, len(correct), window):
        chunk = correct[start:start + window]
        if len(chunk) == window or (len(chunk) >= window / 2) or start == 0:
            out.append(float(np.nanmean(chunk)))
    return np.asarray(out)


def segments_from_labels(corruption: Sequence[str], severity: Sequence[int] | None = None) -> list[dict]:
    """Contiguous runs of the same (corruption, severity): [{start, end, corruption, severity}]."""
    segs: list[dict] = []
    sev = np.asarray(severity) if severity is not None else None
    for i, c in enumerate(corruption):
        s = int(sev[i]) if sev is not None else None
        if segs and segs[-1]['corruption'] == c and segs[-1]['severity'] == s:
            segs[-1]['end'] = i + 1
        else:
            segs.append({'start': i, 'end': i + 1, 'corruption': str(c), 'severity': s})
    return segs


# ----------------------------------------------------------------------------------------------
# frames

@dataclass
class _Frame:
    index: int
    arrival: float
    image: np.ndarray
    label: int
    corruption: str
    severity: int


def _frames(stream, batch_size: int, period: float) -> Iterator[_Frame]:
    """Flatten the stream's batches into frames with their arrival time (index / rate)."""
    i = 0
    for batch in stream.batches(batch_size):
        images = np.asarray(batch.images)
        labels = np.asarray(batch.labels)
        sev = np.asarray(batch.severity)
        for j in range(len(images)):
            yield _Frame(i, i * period, images[j], int(labels[j]), str(batch.corruption[j]),
                         int(sev[j]))
            i += 1


# ----------------------------------------------------------------------------------------------
# the simulation

class _Simulation:
    """One run: predictor timeline (+ adapter timeline in async). See module docstring."""

    def __init__(self, model, stream, method: str, mode: str, gate: bool, config: ProtocolConfig,
                 hparams: Mapping | None, name: str):
        from .serving import ServedModel   # imported late: the evaluator is usable for 'none'
        self.cfg = config
        self.mode = mode
        self.method = method
        self.gate = gate
        self.name = name
        self.arch = model.arch
        self.stream = stream
        self.period = 1.0 / config.rate_hz
        self.clock = CLOCKS[config.clock]
        self.adapt_every = config.adapt_every or config.batch_size
        self.adapt_period = 1.0 / config.adapt_rate_hz if config.adapt_rate_hz > 0 else 0.0
        self.min_new = config.effective_min_new()
        served_kwargs = {} if config.max_delta_norm is None else {'max_delta_norm': config.max_delta_norm}
        self.served = ServedModel(copy.deepcopy(model), **served_kwargs)
        self.adapter = None
        if mode != 'none':
            from .adapter import Adapter
            kwargs = dict(hparams or {})
            if config.memory_capacity is not None:
                kwargs['memory_capacity'] = config.memory_capacity
            self.adapter = Adapter(copy.deepcopy(model), method, batch_size=config.batch_size,
                                   gate=gate, **kwargs)
        n = len(stream)
        self.n = n
        self.correct = np.zeros(n, bool)
        self.predicted = np.zeros(n, bool)
        self.late = np.zeros(n, bool)
        self.latency = np.full(n, np.nan)
        self.version = np.zeros(n, np.int64)
        self.corruption: list[str] = [''] * n
        self.severity = np.zeros(n, np.int64)
        self.compute = {'forward': 0.0, 'ingest': 0.0, 'step': 0.0, 'apply': 0.0, 'drop_scoring': 0.0}
        self.counts = {'steps': 0, 'empty_steps': 0, 'proposals': 0, 'sent': 0, 'applied': 0,
                       'refused': 0, 'reset_deltas': 0}
        self.decisions: dict[str, int] = {}
        self.refusals: dict[str, int] = {}
        self.applied_versions: list[int] = []
        self.apply_lag: list[float] = []
        # predictor timeline
        self.busy_until = 0.0
        self.since_update = 0
        # adapter timeline (async)
        self.published: list[tuple[float, torch.Tensor, int]] = []   # (time, latents, version)
        self.adapter_free = 0.0
        self.next_tick = 0.0
        self.in_flight: list[tuple[float, object]] = []            # (done_at, proposal)
        self.last_time = 0.0

    # -- costs: measured, or fixed when configured
    def _cost(self, kind: str, measured: float) -> float:
        self.compute[kind] += measured
        fixed = self.cfg.fixed_costs
        if fixed is not None and kind in fixed:
            return float(fixed[kind])
        return measured

    def _forward(self, frame: _Frame):
        from .model import preprocess
        t0 = self.clock()
        x = preprocess(frame.image[None], self.arch)
        logits, latents = self.served.predict(x)
        pred = int(torch.as_tensor(logits).argmax(1)[0])
        dt = self.clock() - t0
        return pred, latents, dt

    def _record(self, frame: _Frame, pred: int, version: int) -> None:
        i = frame.index
        self.correct[i] = pred == frame.label
        self.version[i] = version
        self.corruption[i] = frame.corruption
        self.severity[i] = frame.severity

    # -- adapter side
    def _handle_proposal(self, proposal, done_at: float) -> float:
        """Count the proposal; sync applies it at once (returns that cost), async queues it."""
        decision = getattr(proposal, 'decision', None)
        kind = getattr(decision, 'kind', 'accept') if decision is not None else 'none'
        if kind == 'reset':
            self.counts['reset_deltas'] += 1      # deltas that take the served model to source
        self.counts['proposals'] += 1
        if getattr(proposal, 'delta', None) is not None:
            self.counts['sent'] += 1
            if self.mode == 'sync':
                return self._apply(proposal, done_at, done_at)
            self.in_flight.append((done_at, proposal))
        return 0.0

    def _apply(self, proposal, done_at: float, now: float) -> float:
        """ServedModel.apply on the predictor (costs predictor time); ack/refuse the adapter."""
        t0 = self.clock()
        result = self.served.apply(proposal.delta)
        dt = self._cost('apply', self.clock() - t0)
        if result.accepted:
            self.counts['applied'] += 1
            self.applied_versions.append(int(result.version))
            self.apply_lag.append(now - done_at)
            self.adapter.acknowledge(int(result.version))
        else:
            self.counts['refused'] += 1
            # group refusals by kind: numbers and quoted ids vary from one delta to the next
            reason = re.sub(r"'[^']*'|\b\d[\w.+-]*", '#', str(result.reason))[:80] or 'refused'
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
            self.adapter.refused(str(result.reason))
            # Only when the adapter's base no longer matches what is served does it adopt the
            # served state (the ROS adapter does this through get_adaptable_state); any other
            # refusal just discards the delta and the adapter keeps what it learnt.
            if 'base_version' in str(result.reason) or getattr(self.adapter, 'needs_resync', False):
                version, state = self.served.state()
                self.adapter.resync(int(version), state)
                self.counts['resyncs'] = self.counts.get('resyncs', 0) + 1
        return dt

    def _ingest_published(self, until: float) -> float:
        """Adapter ingests latents published up to `until`; returns the (virtual) cost."""
        cost = 0.0
        k = 0
        while k < len(self.published) and self.published[k][0] <= until:
            _, latents, version = self.published[k]
            t0 = self.clock()
            self.adapter.ingest(latents, version)
            cost += self._cost('ingest', self.clock() - t0)
            k += 1
        del self.published[:k]
        return cost

    def _adapter_step(self, start: float) -> float:
        t0 = self.clock()
        proposal = self.adapter.step()
        cost = self._cost('step', self.clock() - t0)
        self.counts['steps'] += 1
        if proposal is None:
            self.counts['empty_steps'] += 1
        else:
            cost += self._handle_proposal(proposal, start + cost)
        return cost

    def _advance_adapter(self, now: float) -> None:
        """Run every adapter step that starts at or before `now` on the adapter's timeline.

        A step starts when the adapter is free, no more than `max_in_flight` proposals await an
        answer, at least `min_new` latents were published since its last step (no point in
        re-fitting the same memory over and over) and, with a timer (`adapt_rate_hz` > 0), on a
        tick of that timer.
        """
        while len(self.in_flight) < self.cfg.max_in_flight:
            if len(self.published) < self.min_new:
                return
            start = max(self.adapter_free, self.published[self.min_new - 1][0])
            if self.adapt_period:
                ticks = math.ceil(max(0.0, start - self.next_tick) / self.adapt_period - 1e-9)
                start = self.next_tick + ticks * self.adapt_period
            if start > now:
                return
            cost = self._ingest_published(start)
            cost += self._adapter_step(start + cost)
            self.adapter_free = start + cost
            if self.adapt_period:
                self.next_tick = start + self.adapt_period

    def _apply_ready(self, now: float) -> float:
        cost = 0.0
        while self.in_flight and self.in_flight[0][0] <= now:
            done_at, proposal = self.in_flight.pop(0)
            cost += self._apply(proposal, done_at, now)
            # the adapter learns the answer now: it cannot act on it earlier
            self.adapter_free = max(self.adapter_free, now)
        return cost

    # -- predictor side
    def _serve(self, frame: _Frame, start: float) -> None:
        extra = 0.0
        if self.mode == 'async':
            self._advance_adapter(start)
            extra += self._apply_ready(start)
            self._advance_adapter(start)
        pred, latents, dt = self._forward(frame)
        dt = self._cost('forward', dt)
        version = int(self.served.version)
        done = start + extra + dt
        i = frame.index
        self._record(frame, pred, version)
        self.predicted[i] = True
        self.late[i] = start > frame.arrival
        self.latency[i] = done - frame.arrival
        busy = done
        if self.mode == 'async':
            self.published.append((done, latents, version))
        elif self.mode == 'sync':
            t0 = self.clock()
            self.adapter.ingest(latents, version)
            busy += self._cost('ingest', self.clock() - t0)
            self.since_update += 1
            if self.since_update >= self.adapt_every:
                self.since_update = 0
                busy += self._adapter_step(busy)     # includes the inline apply
        self.busy_until = busy
        self.last_time = max(self.last_time, busy)

    def _drop(self, frame: _Frame) -> None:
        """Dropped frame: scored with the latest applied model, no timeline is charged."""
        t0 = self.clock()
        pred, _, _ = self._forward(frame)
        self.compute['drop_scoring'] += self.clock() - t0
        self._record(frame, pred, int(self.served.version))

    def run(self, progress: bool = False) -> RunResult:
        wall0 = time.perf_counter()
        bar = _progress_bar(self.n, self.name, progress)
        queued: _Frame | None = None
        seen = 0
        for frame in _frames(self.stream, _READ_BATCH, self.period):
            if frame.index >= self.n:
                raise ValueError(f'stream yielded more than len(stream) = {self.n} frames')
            # the predictor works off its queue until this arrival
            while queued is not None and self.busy_until <= frame.arrival:
                q, queued = queued, None
                self._serve(q, self.busy_until)
            if self.busy_until <= frame.arrival:
                self._serve(frame, frame.arrival)
            elif self.cfg.queue_size == 0:
                self._drop(frame)
            else:
                if queued is not None:
                    self._drop(queued)       # keep-last-1: the newer frame replaces it
                queued = frame
            seen += 1
            if bar is not None:
                bar.update(1)
        if queued is not None:
            self._serve(queued, max(self.busy_until, queued.arrival))
        if bar is not None:
            bar.close()
        if seen != self.n:
            raise ValueError(f'stream yielded {seen} frames, len(stream) says {self.n}')
        # proposals still travelling when the stream ended (never applied nor refused)
        self.counts['in_flight_at_end'] = len(self.in_flight)
        info = {}
        decisions = dict(self.decisions)
        if self.adapter is not None:
            counters = getattr(self.adapter, 'counters', None)
            if isinstance(counters, Mapping):
                info['counters'] = _jsonable(counters)
                # the gate's verdicts, including those that send nothing (hold, rollback)
                decisions = {kind: int(counters.get(key, 0)) for kind, key in _DECISION_COUNTERS}
            status = getattr(self.adapter, 'status', None)
            if callable(status):
                try:
                    info['status'] = _jsonable(status())
                except Exception as exc:  # noqa: BLE001 - status is informative only
                    info['status'] = f'unavailable: {exc}'
        self.decisions = decisions
        return RunResult(
            name=self.name, method=self.method, mode=self.mode, gate=self.gate,
            config=self.cfg.to_dict(), correct=self.correct, predicted=self.predicted,
            late=self.late, latency_s=self.latency, version=self.version,
            corruption=self.corruption, severity=self.severity, window=self.cfg.window,
            compute_s=dict(self.compute), counts=dict(self.counts), decisions=dict(self.decisions),
            refusals=dict(self.refusals), applied_versions=list(self.applied_versions),
            apply_lag_s=list(self.apply_lag), wall_s=time.perf_counter() - wall0,
            virtual_s=max(self.last_time, (self.n - 1) * self.period if self.n else 0.0),
            adapter_info=info)


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit='frame', dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------
# public entry points

def run_name(method: str, mode: str, gate: bool) -> str:
    if mode == 'none':
        return 'source/none'
    tag = method
    if gate != default_gate(method):
        tag += GATE_ON if gate else GATE_OFF
    return f'{tag}/{mode}'


def run_protocol(model, stream, method: str = 'source', mode: str = 'none', *,
                 config: ProtocolConfig | None = None, gate: bool | None = None,
                 hparams: Mapping | None = None, progress: bool = False,
                 name: str | None = None) -> RunResult:
    """Evaluate one (method, mode) on `stream` (a DriftStream) with `model` (a SplitModel).

    `model` is not modified (served model and adapter work on copies). mode 'none' ignores
    `method` (it is the source model). `gate=None` uses `default_gate(method)`.
    """
    config = config or ProtocolConfig()
    config.validate()
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}; choose one of {MODES}')
    method, spec_gate = parse_method_spec(method)
    if gate is None:
        gate = spec_gate if spec_gate is not None else default_gate(method)
    if mode == 'none':
        method, gate = 'source', False
    else:
        from .methods import METHODS
        if method not in METHODS:
            raise ValueError(f'unknown method {method!r}; choose one of {sorted(METHODS)}')
        if method == 'source':
            raise ValueError("method 'source' does not adapt: evaluate it with mode 'none'")
    if len(stream) < 1:
        raise ValueError('empty stream')
    sim = _Simulation(model, stream, method, mode, bool(gate), config, hparams,
                      name or run_name(method, mode, bool(gate)))
    return sim.run(progress=progress)


def plan_runs(methods: Iterable[str], modes: Iterable[str]) -> list[tuple[str, str, bool]]:
    """(method, mode, gate) triples to evaluate: 'source' (or mode 'none') is evaluated once,
    in mode none; every other method in each requested adapting mode."""
    methods = [m.strip() for m in methods if m.strip()]
    modes = [m.strip() for m in modes if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f'unknown mode {mode!r}; choose one of {MODES}')
    plan: list[tuple[str, str, bool]] = []
    if 'none' in modes or any(parse_method_spec(m)[0] == 'source' for m in methods):
        plan.append(('source', 'none', False))
    for spec in methods:
        method, gate = parse_method_spec(spec)
        if method == 'source':
            continue
        gate = default_gate(method) if gate is None else gate
        for mode in modes:
            if mode != 'none' and (method, mode, gate) not in plan:
                plan.append((method, mode, gate))
    return plan


def evaluate(model, stream, methods: Sequence[str], modes: Sequence[str], *,
             config: ProtocolConfig | None = None, hparams: Mapping[str, Mapping] | None = None,
             progress: bool = False, log: Callable[[str], None] | None = None) -> list[RunResult]:
    """Run the plan of `plan_runs(methods, modes)` on the same stream; results in plan order.

    `hparams` maps a method name to its hyper-parameters (passed to the Adapter)."""
    config = config or ProtocolConfig()
    config.validate()
    plan = plan_runs(methods, modes)
    if not plan:
        raise ValueError('nothing to evaluate: no methods/modes given')
    if any(mode != 'none' for _, mode, _ in plan):
        from .methods import METHODS
        unknown = [m for m, mode, _ in plan if mode != 'none' and m not in METHODS]
        if unknown:
            raise ValueError(f'unknown method(s) {unknown}; choose from {sorted(METHODS)}')
    results = []
    for method, mode, gate in plan:
        hp = (hparams or {}).get(method)
        res = run_protocol(model, stream, method, mode, config=config, gate=gate, hparams=hp,
                           progress=progress)
        if log:
            log(f'{res.name}: online accuracy {res.accuracy * 100:.2f} % '
                f'({int((~res.predicted).sum())} dropped, {int(res.late.sum())} late, '
                f'{res.counts.get("applied", 0)} updates applied, wall {res.wall_s:.0f} s)')
        results.append(res)
    return results


def offline_accuracy(model, stream, batch_size: int = 256) -> float:
    """Plain batched accuracy of `model` (eval mode, no adaptation) over the stream's frames."""
    from .model import preprocess
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in stream.batches(batch_size):
            logits = model(preprocess(np.asarray(batch.images), model.arch))
            correct += int((logits.argmax(1).numpy() == np.asarray(batch.labels)).sum())
            total += len(batch.labels)
    return correct / max(1, total)


def window_deficits(results: Sequence[RunResult], reference: str = 'source/none') -> dict:
    """Per run: the worst per-window accuracy difference to the reference run (points)."""
    ref = next((r for r in results if r.name == reference), None)
    if ref is None:
        return {}
    ref_w = ref.window_accuracy()
    out = {}
    for r in results:
        w = r.window_accuracy()
        k = min(len(w), len(ref_w))
        if k == 0:
            continue
        diff = (w[:k] - ref_w[:k]) * 100
        worst = int(np.argmin(diff))
        out[r.name] = {'min_diff_points': float(diff[worst]), 'worst_window': worst,
                       'windows_below_2_points': int((diff < -2).sum()), 'windows': k}
    return out
