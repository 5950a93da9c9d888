#!/usr/bin/env python3
"""Soak run: the whole graph (sim camera -> perception -> adaptation -> monitor) for a long time.

Not a test: a measurement. Starts the four nodes as separate processes with
config/sim_pipeline.yaml (as `make demo` does), listens to `ground_truth`, `prediction` and
`prediction_source` itself, and every `--interval` seconds records one row:

- RSS (VmRSS from /proc/PID/status) and CPU seconds of every node process,
- frames published / predicted / missing in the interval,
- perception latency (Prediction.latency_ms) and end-to-end latency (image stamp -> receipt
  here) p50 / p99 over the interval,
- online accuracy of the adapted model and of the frozen source model over the interval,
- served model version.

Prints a table as it goes and writes `soak.csv` + `soak.json` (rows + a start/end summary per
process) to --output-dir. What it answers: does any process grow without bound, does latency
creep up, does accuracy collapse over a long non-i.i.d. stream.

    python scripts/soak.py --minutes 30 --output-dir results/soak
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import (CONFIG, NODES, cpu_seconds, ensure_source_model, interrupt,  # noqa: E402
                  ros_environment, start)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--minutes', type=float, default=30.0, help='duration (default 30)')
    p.add_argument('--interval', type=float, default=60.0, help='seconds per sample row (default 60)')
    p.add_argument('--rate', type=float, default=30.0, help='camera rate, Hz (default 30)')
    p.add_argument('--method', default='norm', help='adaptation method (default norm)')
    p.add_argument('--output-dir', default='results/soak')
    p.add_argument('--config', default=str(CONFIG))
    p.add_argument('--domain-id', type=int, default=None)
    return p.parse_args(argv)


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS), nan when it is gone."""
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


class Listener:
    """Joins ground truth with adapted and source predictions by stamp, per interval."""

    def __init__(self, domain_id: int):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        from async_ttt_ros import qos
        from async_ttt_ros_interfaces.msg import GroundTruth, Prediction
        from async_ttt_ros_interfaces.srv import GetAdaptableState
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('soak_listener', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.truth: dict[tuple[int, int], int] = {}          # stamp -> class, current interval
        self.adapted: dict[tuple[int, int], tuple[int, float, float, int]] = {}
        self.source: dict[tuple[int, int], int] = {}
        self.node.create_subscription(GroundTruth, 'ground_truth', self._on_truth,
                                      qos.ground_truth_qos(1000))
        self.node.create_subscription(Prediction, 'prediction', self._on_pred, qos.prediction_qos(1000))
        self.node.create_subscription(Prediction, 'prediction_source', self._on_source,
                                      qos.prediction_qos(1000))
        self.state_client = self.node.create_client(GetAdaptableState, 'get_adaptable_state')
        from diagnostic_msgs.msg import DiagnosticArray
        self.diagnostics: dict[str, dict[str, str]] = {}    # latest values per status name
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            self.diagnostics[status.name] = {kv.key: kv.value for kv in status.values}

    @staticmethod
    def _key(header) -> tuple[int, int]:
        return header.stamp.sec, header.stamp.nanosec

    def _on_truth(self, msg) -> None:
        self.truth[self._key(msg.header)] = int(msg.class_index)

    def _on_pred(self, msg) -> None:
        now_ns = time.time_ns()
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.adapted[self._key(msg.header)] = (int(msg.class_index), float(msg.latency_ms),
                                               (now_ns - stamp_ns) * 1e-6, int(msg.model_version))

    def _on_source(self, msg) -> None:
        self.source[self._key(msg.header)] = int(msg.class_index)

    def spin(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=min(0.1, max(0.0, deadline - time.monotonic())))

    def take_interval(self) -> dict:
        """Score the frames of the interval whose ground truth arrived; keep late ones for the
        next interval (a prediction may arrive a few ms after the boundary)."""
        truths, adapted, source = self.truth, self.adapted, self.source
        self.truth, self.adapted, self.source = {}, {}, {}
        scored = [k for k in truths if k in adapted]
        # predictions without their ground truth yet (and vice versa) wait one more interval
        for k, v in adapted.items():
            if k not in truths:
                self.adapted[k] = v
        for k, v in source.items():
            if k not in truths:
                self.source[k] = v
        lat = np.array([adapted[k][1] for k in scored]) if scored else np.array([math.nan])
        e2e = np.array([adapted[k][2] for k in scored]) if scored else np.array([math.nan])
        acc = float(np.mean([adapted[k][0] == truths[k] for k in scored])) if scored else math.nan
        src = [k for k in truths if k in source]
        src_acc = float(np.mean([source[k] == truths[k] for k in src])) if src else math.nan
        version = max((v[3] for v in adapted.values()), default=-1)
        return {'frames': len(truths), 'predicted': len(scored), 'missing': len(truths) - len(scored),
                'lat_p50_ms': float(np.percentile(lat, 50)), 'lat_p99_ms': float(np.percentile(lat, 99)),
                'e2e_p50_ms': float(np.percentile(e2e, 50)), 'e2e_p99_ms': float(np.percentile(e2e, 99)),
                'acc_adapted': acc, 'acc_source': src_acc, 'model_version': version}

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


COLUMNS = ('t_s', 'frames', 'predicted', 'missing', 'lat_p50_ms', 'lat_p99_ms', 'e2e_p50_ms',
           'e2e_p99_ms', 'acc_adapted', 'acc_source', 'model_version')


def fmt(value) -> str:
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else f'{value:.3f}' if abs(value) < 10 else f'{value:.1f}'
    return str(value)


def main(argv=None) -> int:
    import yaml
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    domain = args.domain_id if args.domain_id is not None else random.randint(1, 100)
    env = ros_environment(domain)
    config = Path(args.config).resolve()
    ensure_source_model(config)
    overrides = out / 'logs' / 'overrides.yaml'
    overrides.write_text(yaml.safe_dump({
        '/**/sim_camera_node': {'ros__parameters': {'rate': float(args.rate), 'loop': True}},
        '/**/adaptation_node': {'ros__parameters': {'method': args.method}},
        '/**/monitor_node': {'ros__parameters': {'output_dir': str(out), 'report_period': 60.0}},
    }))
    listener = Listener(domain)
    procs = {}
    rows: list[dict] = []
    print(f'soak: {args.minutes:g} min at {args.rate:g} Hz, domain {domain}, output {out}', flush=True)
    try:
        for name in NODES:
            if name == 'sim_camera_node':   # frames before perception serves would be "missing"
                deadline = time.monotonic() + 120.0
                while not listener.state_client.service_is_ready() and time.monotonic() < deadline:
                    listener.spin(0.2)
            procs[name] = start([sys.executable, '-m', f'async_ttt_ros.nodes.{name}', '--ros-args',
                                 '--params-file', str(config), '--params-file', str(overrides)],
                                env, out / 'logs' / f'{name}.log')
        listener.spin(5.0)            # warm-up: discovery, first frames
        listener.take_interval()
        names = list(procs)
        header = COLUMNS + tuple(f'rss_{n.replace("_node", "")}_mib' for n in names)
        print(' '.join(f'{h:>14}' for h in header), flush=True)
        t0 = time.monotonic()
        cpu0 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        rss0 = {n: rss_mib(p.pid) for n, p in procs.items()}
        while time.monotonic() - t0 < args.minutes * 60.0:
            listener.spin(min(args.interval, args.minutes * 60.0 - (time.monotonic() - t0)))
            row = {'t_s': round(time.monotonic() - t0, 1), **listener.take_interval()}
            for n, p in procs.items():
                row[f'rss_{n.replace("_node", "")}_mib'] = rss_mib(p.pid)
                row[f'cpu_{n.replace("_node", "")}_s'] = (cpu_seconds(p.pid) or math.nan) - (cpu0[n] or 0.0)
            rows.append(row)
            print(' '.join(f'{fmt(row[h]):>14}' for h in header), flush=True)
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                print(f'process(es) exited early: {dead}; see {out / "logs"}', file=sys.stderr)
                break
        elapsed = time.monotonic() - t0
        rss1 = {n: rss_mib(p.pid) for n, p in procs.items()}
    finally:
        listener_diagnostics = dict(listener.diagnostics)
        interrupt(procs)
        listener.close()
    if not rows:
        return 1
    with open(out / 'soak.csv', 'w', newline='') as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    frames = sum(r['frames'] for r in rows)
    summary = {
        'duration_s': round(elapsed, 1), 'rate_hz': args.rate, 'interval_s': args.interval,
        'method': args.method, 'frames': frames, 'predicted': sum(r['predicted'] for r in rows),
        'rss_mib': {n: {'start': rss0[n], 'end': rss1[n], 'max': max(r[f'rss_{n.replace("_node", "")}_mib']
                                                                     for r in rows)} for n in procs},
        'lat_p50_ms': [r['lat_p50_ms'] for r in rows], 'lat_p99_ms': [r['lat_p99_ms'] for r in rows],
        'acc_adapted': [r['acc_adapted'] for r in rows], 'acc_source': [r['acc_source'] for r in rows],
        'diagnostics_at_end': listener_diagnostics,
    }
    (out / 'soak.json').write_text(json.dumps({'summary': summary, 'rows': rows}, indent=1))
    print(f'\n{elapsed / 60:.1f} min, {frames} frames, {summary["predicted"]} predicted')
    for n, r in summary['rss_mib'].items():
        print(f'  RSS {n:16s} start {r["start"]:7.1f} MiB  end {r["end"]:7.1f} MiB  max {r["max"]:7.1f} MiB')
    for name, values in listener_diagnostics.items():
        print(f'  {name}: ' + ', '.join(f'{k}={v}' for k, v in values.items()))
    print(f'wrote {out / "soak.csv"} and {out / "soak.json"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
