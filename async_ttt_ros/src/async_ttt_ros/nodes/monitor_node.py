"""monitor_node: scores the running graph against ground truth and writes the report.

Joins `prediction` (and, when perception publishes it, `prediction_source`: the frozen source
model on the very same frames) with `ground_truth` by header stamp. A ground truth that gets no
prediction within `match_timeout` seconds is a dropped frame. Reports, live on /diagnostics and
at shutdown in `output_dir/report.json` + `plot.png` (core/report.py): online accuracy (overall
and per window), end-to-end latency p50/p99 (image stamp -> prediction receipt, on this node's
clock: sim time under use_sim_time), perception latency, dropped frames, model versions seen,
and the adaptation status.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.time import Time

from async_ttt_ros_interfaces.msg import AdaptationStatus, GroundTruth, Prediction

from .. import qos
from ..core.frame_log import FrameLog
from ._common import declare, diagnostic_array, run


LIVE_LATENCY_FRAMES = 10_000   # /diagnostics latency percentiles: the newest ~5 min at 30 Hz


def _key(header) -> tuple[int, int]:
    return int(header.stamp.sec), int(header.stamp.nanosec)


class MonitorNode(Node):
    def __init__(self, **kwargs):
        super().__init__('monitor_node', **kwargs)
        self.window = declare(self, 'window', 300, 'Frames per accuracy window.',
                              int_range=(1, 10_000_000))
        self.match_timeout = declare(self, 'match_timeout', 2.0, 'Seconds a ground truth waits '
                                     'for its prediction before the frame counts as dropped.',
                                     float_range=(0.01, 600.0))
        self.output_dir = declare(self, 'output_dir', 'results/monitor', 'Where report.json and '
                                  'plot.png are written ("" = no report).')
        self.report_period = declare(self, 'report_period', 10.0, 'Seconds between rewrites of '
                                     'report.json (0 = only at shutdown); plot.png is drawn at '
                                     'shutdown.', float_range=(0.0, 3600.0))
        diag_period = declare(self, 'diagnostics_period', 1.0, 'Seconds between /diagnostics.',
                              float_range=(0.05, 3600.0))
        self.run_name = declare(self, 'run_name', '', 'Name of the adapted run in the report '
                                '("" = "adapted (<method>)" from adaptation_status).')

        self._lock = threading.Lock()
        # Only frames still waiting for a prediction are keyed by stamp; everything else lives
        # in the FrameLog's arrays (hours of frames, a few bytes each).
        self._pending_truth: dict[tuple[int, int], tuple[GroundTruth, float, int]] = {}
        self._pending_pred: dict[str, dict[tuple[int, int], tuple[Prediction, float]]] = {
            'adapted': {}, 'source': {}}
        self.log = FrameLog(('adapted', 'source'))
        self.tracks = self.log.tracks
        self.dropped = 0
        self.model_version = 0
        self.versions_seen: set[int] = set()
        self.status: AdaptationStatus | None = None
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._t_start = time.monotonic()

        group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(GroundTruth, 'ground_truth', self._on_truth,
                                 qos.ground_truth_qos(1000), callback_group=group)
        self.create_subscription(Prediction, 'prediction', lambda m: self._on_prediction(m, 'adapted'),
                                 qos.prediction_qos(1000), callback_group=group)
        self.create_subscription(Prediction, 'prediction_source',
                                 lambda m: self._on_prediction(m, 'source'),
                                 qos.prediction_qos(1000), callback_group=group)
        self.create_subscription(AdaptationStatus, 'adaptation_status', self._on_status,
                                 qos.status_qos(), callback_group=group)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', qos.diagnostics_qos())
        self.create_timer(diag_period, self._on_diag_timer, callback_group=group, clock=self._steady)
        if self.report_period > 0 and self.output_dir:
            # JSON only: the plot (matplotlib) is the costly part of a report and is needed once,
            # at shutdown; drawing it every period would hold the GIL this node's joins need.
            self.create_timer(self.report_period, lambda: self.write_report(plot=False),
                              callback_group=MutuallyExclusiveCallbackGroup(), clock=self._steady)

    # -- joining -----------------------------------------------------------------------------------
    def _on_truth(self, msg: GroundTruth) -> None:
        key = _key(msg.header)
        with self._lock:
            row = self.log.add_truth(int(msg.frame_index), str(msg.corruption), int(msg.severity))
            self._pending_truth[key] = (msg, time.monotonic(), row)
            for name, pending in self._pending_pred.items():
                if key in pending:
                    pred, received_ns = pending.pop(key)
                    self._score(name, row, msg, pred, received_ns)
            self._settle(key, row)

    def _on_prediction(self, msg: Prediction, name: str) -> None:
        received_ns = self.get_clock().now().nanoseconds
        key = _key(msg.header)
        with self._lock:
            truth = self._pending_truth.get(key)
            if truth is None:    # prediction before its ground truth: hold it briefly
                self._pending_pred[name][key] = (msg, received_ns)
                return
            self._score(name, truth[2], truth[0], msg, received_ns)
            self._settle(key, truth[2])

    def _settle(self, key, row: int) -> None:
        """Forget the stamp of a frame every track has scored."""
        if all(track.is_scored(row) for track in self.tracks.values()):
            del self._pending_truth[key]

    def _score(self, name: str, row: int, truth: GroundTruth, pred: Prediction, received_ns: int) -> None:
        track = self.tracks[name]
        if track.is_scored(row):     # a duplicate (e.g. a replayed bag): the first one counts
            return
        track.score(row, int(pred.class_index) == int(truth.class_index), int(pred.model_version))
        if name == 'adapted':
            stamp_ns = Time.from_msg(truth.header.stamp).nanoseconds
            self.log.add_latency((received_ns - stamp_ns) * 1e-6, float(pred.latency_ms))
            self.model_version = int(pred.model_version)
            self.versions_seen.add(int(pred.model_version))

    def _expire(self) -> None:
        """Ground truths older than match_timeout without a prediction are dropped frames.

        A track's prediction that comes later is not scored: the frame stays dropped.
        """
        now = time.monotonic()
        with self._lock:
            for key, (_msg, t, row) in list(self._pending_truth.items()):
                if now - t < self.match_timeout:
                    continue
                if not self.tracks['adapted'].is_scored(row):
                    self.dropped += 1
                del self._pending_truth[key]
            for pending in self._pending_pred.values():
                for key in [k for k, (_, r) in pending.items()
                            if (self.get_clock().now().nanoseconds - r) * 1e-9 > 10 * self.match_timeout]:
                    del pending[key]

    def _on_status(self, msg: AdaptationStatus) -> None:
        self.status = msg

    # -- outputs -----------------------------------------------------------------------------------
    def summary(self, latency_last: int | None = None) -> dict:
        """Counts and accuracies of the whole run; latency percentiles over the whole run or,
        with `latency_last`, over the newest frames only (what /diagnostics shows every second:
        a percentile over hours of frames would cost more each second)."""
        with self._lock:
            e2e, perc = self.log.e2e_ms.view(), self.log.perception_ms.view()
            if latency_last:
                e2e, perc = e2e[-latency_last:], perc[-latency_last:]
            adapted, source = self.tracks['adapted'], self.tracks['source']
            frames = len(self.log)
            predicted = adapted.scored
            return {
                'frames': frames, 'predicted': predicted, 'dropped': self.dropped,
                'accuracy': adapted.accuracy(), 'accuracy_window': adapted.accuracy(self.window),
                'source_accuracy': source.accuracy(),
                'source_accuracy_window': source.accuracy(self.window),
                'e2e_latency_p50_ms': _pct(e2e, 50), 'e2e_latency_p99_ms': _pct(e2e, 99),
                'perception_latency_p50_ms': _pct(perc, 50),
                'perception_latency_p99_ms': _pct(perc, 99),
                'model_version': self.model_version, 'versions_seen': len(self.versions_seen),
                'elapsed_s': time.monotonic() - self._t_start, 'latency_frames': int(e2e.size),
            }

    def _on_diag_timer(self) -> None:
        if not self.context.ok():
            return
        self._expire()
        s = self.summary(latency_last=LIVE_LATENCY_FRAMES)
        st = self.status
        values = {**s}
        if st is not None:
            values.update({'adapter_steps': st.steps, 'deltas_sent': st.deltas_sent,
                           'deltas_refused': st.deltas_refused, 'calls_failed': st.calls_failed,
                           'last_decision': st.last_decision})
        self.diag_pub.publish(diagnostic_array(
            self, 'monitor_node: evaluation', DiagnosticStatus.OK,
            f"acc {_fmt_pct(s['accuracy'])} (source {_fmt_pct(s['source_accuracy'])}), "
            f"version {s['model_version']}", values))

    def _run(self, name: str, track, method: str, frames: int, e2e: np.ndarray,
             perc: np.ndarray) -> dict:
        correct = track.correct.view().astype(np.float64)
        predicted = track.scored
        windows = []
        for start in range(0, len(correct), self.window):
            chunk = correct[start:start + self.window]
            if np.isfinite(chunk).any():
                windows.append(float(np.nanmean(chunk)))
        return {
            'name': name, 'method': method, 'mode': 'ros',
            'accuracy': float(np.nanmean(correct)) if predicted else None,
            'accuracy_strict': float(np.nan_to_num(correct, nan=0.0).mean()) if frames else None,
            'frames': {'total': frames, 'predicted': predicted, 'dropped': frames - predicted},
            'updates': {'applied': int(np.unique(track.versions.view()[track.versions.view() > 0]).size)},
            'decisions': None,
            'latency_ms': {'p50': _pct(e2e, 50), 'p99': _pct(e2e, 99),
                           'perception_p50': _pct(perc, 50), 'perception_p99': _pct(perc, 99)},
            'compute_ms_per_frame': {},
            'windows': {'size': self.window, 'values': windows,
                        'min': min(windows) if windows else None},
            'correct': correct,
        }

    def write_report(self, plot: bool = True) -> dict | None:
        """report.json (+ plot.png) in output_dir (atomic); returns the paths."""
        if not self.output_dir:
            return None
        from ..core.report import write_report
        self._expire()
        with self._lock:
            frames = len(self.log)
            e2e = self.log.e2e_ms.view().astype(np.float64)
            perc = self.log.perception_ms.view().astype(np.float64)
            method = self.status.method if self.status is not None else 'served'
            name = self.run_name or f'adapted ({method})'
            runs = [self._run(name, self.tracks['adapted'], method, frames, e2e, perc)]
            if self.tracks['source'].scored:
                runs.append(self._run('source (frozen)', self.tracks['source'], 'source', frames,
                                      np.asarray([]), np.asarray([])))
            segments = self.log.segment_list()
        status = self.status
        extra = {'summary': self.summary()}
        if status is not None:
            extra['adaptation'] = {
                'method': status.method, 'served_version': status.served_version,
                'steps': status.steps, 'accepted': status.accepted, 'held': status.held,
                'rolled_back': status.rolled_back, 'resets': status.resets,
                'deltas_sent': status.deltas_sent, 'deltas_refused': status.deltas_refused,
                'calls_failed': status.calls_failed, 'last_decision': status.last_decision}
            runs[0]['decisions'] = {'accept': status.accepted, 'hold': status.held,
                                    'rollback': status.rolled_back, 'reset': status.resets}
        try:
            paths = write_report(runs, Path(self.output_dir), segments, window=self.window,
                                 meta={'source': 'monitor_node', 'node': self.get_fully_qualified_name()},
                                 extra=extra, plot=plot,
                                 title='ROS graph: online accuracy under drift')
        except Exception as exc:  # noqa: BLE001 - a failed report must not kill the monitor
            self.get_logger().error(f'writing the report to {self.output_dir} failed: {exc}')
            return None
        return {k: str(v) for k, v in paths.items()}


def _pct(values: np.ndarray, q: float):
    return float(np.percentile(values, q)) if values.size else None


def _fmt_pct(value) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value * 100:.1f}%'


def main(args=None) -> int:
    def finish(node: MonitorNode) -> None:
        paths = node.write_report()
        if paths:
            s = node.summary()
            print(f"monitor: {s['frames']} frames, accuracy {_fmt_pct(s['accuracy'])} "
                  f"(source {_fmt_pct(s['source_accuracy'])}), report {paths}", flush=True)
    # Single-threaded: measured in `make demo`, rclpy's MultiThreadedExecutor spent most of this
    # node's CPU (~27 ms per frame) on its own bookkeeping (polling its backlog of pending
    # callback futures), fell behind, and inflated the end-to-end latencies it reports.
    return run(MonitorNode, on_shutdown=finish, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
