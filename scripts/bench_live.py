#!/usr/bin/env python3
"""`make bench-live`: the live ROS graph at 30 Hz in modes none / async / sync, side by side.

For each architecture (fmnist_cnn, camera_resnet18) and each mode, starts sim_camera_node +
perception_node (+ adaptation_node in async mode) as real processes over real DDS, lets them
warm up, then measures over a fixed window: perception latency p50/p99 (Prediction.latency_ms:
image callback entry to publish), end-to-end latency (image stamp to receipt here), frames
dropped (ground truths with no prediction) and CPU time per frame of every process (utime +
stime from /proc/<pid>/stat). Prints a table and the async/none and sync/none ratios, all
measured in one run on this machine (compare ratios, not absolute numbers across machines).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'async_ttt_ros' / 'config' / 'sim_pipeline.yaml'
FASTDDS_PROFILE = ROOT / 'async_ttt_ros' / 'config' / 'fastdds_large_images.xml'
MODES = ('none', 'async', 'sync')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--archs', default='fmnist_cnn,camera_resnet18')
    p.add_argument('--modes', default=','.join(MODES))
    p.add_argument('--rate', type=float, default=30.0)
    p.add_argument('--warmup', type=float, default=5.0, help='seconds before measuring')
    p.add_argument('--measure', type=float, default=20.0, help='seconds measured per run')
    p.add_argument('--method', default='norm')
    p.add_argument('--output', default='results/bench_live.json')
    p.add_argument('--markdown', action='store_true', help='print the table as markdown')
    p.add_argument('--from-json', default=None, help='only print the table of an earlier run')
    return p.parse_args(argv)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return float('nan')
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def start(module: str, env, params: list[str], log: Path) -> subprocess.Popen:
    # Overrides as a second parameter file under the node's own key (a plain -p would lose
    # against the config's /**/<node> section).
    import yaml
    values = {}
    for p in params:
        key, _, value = p.partition(':=')
        values[key] = yaml.safe_load(value)
    override = log.with_suffix('.params.yaml')
    override.write_text(yaml.safe_dump({f'/**/{module}': {'ros__parameters': values}}))
    cmd = [sys.executable, '-m', f'async_ttt_ros.nodes.{module}', '--ros-args',
           '--params-file', str(CONFIG), '--params-file', str(override)]
    return subprocess.Popen(cmd, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)


def stop(procs) -> None:
    for p in procs.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
    for p in procs.values():
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_one(arch: str, mode: str, args, logs: Path) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from async_ttt_ros import qos
    from async_ttt_ros_interfaces.msg import GroundTruth, Prediction
    from async_ttt_ros_interfaces.srv import GetAdaptableState

    domain = random.randint(1, 100)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               FASTDDS_DEFAULT_PROFILES_FILE=str(FASTDDS_PROFILE), OMP_NUM_THREADS='1',
               PYTHONUNBUFFERED='1')
    env.pop('ROS_LOCALHOST_ONLY', None)
    common = [f'arch:={arch}', 'num_threads:=1']
    tag = f'{arch}-{mode}'
    procs = {'perception': start('perception_node', env, common + [
        f'mode:={"async" if mode == "async" else mode}', 'publish_source_prediction:=false',
        f'method:={args.method}'], logs / f'{tag}-perception.log')}
    if mode == 'async':
        procs['adaptation'] = start('adaptation_node', env, common + [
            f'method:={args.method}', 'batch_size:=32', 'memory_capacity:=256'],
            logs / f'{tag}-adaptation.log')
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node('bench_probe', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    preds: dict[tuple[int, int], tuple[float, float, int]] = {}
    truths: list[tuple[tuple[int, int], float]] = []

    def on_pred(msg):
        now = time.time()
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        preds[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = (
            float(msg.latency_ms), (now - stamp) * 1e3, int(msg.model_version))

    def on_truth(msg):
        truths.append(((msg.header.stamp.sec, msg.header.stamp.nanosec), time.monotonic()))

    node.create_subscription(Prediction, 'prediction', on_pred, qos.prediction_qos(1000))
    node.create_subscription(GroundTruth, 'ground_truth', on_truth, qos.ground_truth_qos(1000))
    client = node.create_client(GetAdaptableState, 'get_adaptable_state')

    def spin(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
    try:
        deadline = time.monotonic() + 180
        while not client.service_is_ready() and time.monotonic() < deadline:
            spin(0.2)
        if not client.service_is_ready():
            raise RuntimeError(f'{tag}: perception did not come up; see {logs}')
        procs['camera'] = start('sim_camera_node', env, [f'rate:={args.rate}', 'stream_length:=5000'],
                                logs / f'{tag}-camera.log')
        while not truths and time.monotonic() < deadline:
            spin(0.2)
        spin(args.warmup)
        cpu0 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        t0 = time.monotonic()
        spin(args.measure)
        cpu1 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        t1 = time.monotonic()
        spin(1.0)     # late predictions of frames inside the window
    finally:
        stop(procs)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        context.try_shutdown()
    window = [k for k, t in truths if t0 <= t < t1]
    got = [preds[k] for k in window if k in preds]
    lat = np.array([g[0] for g in got]) if got else np.array([np.nan])
    e2e = np.array([g[1] for g in got]) if got else np.array([np.nan])
    n = max(1, len(window))
    versions = [g[2] for g in got]
    return {
        'arch': arch, 'mode': mode, 'frames': len(window), 'predicted': len(got),
        'dropped': len(window) - len(got), 'dropped_pct': 100.0 * (len(window) - len(got)) / n,
        'rate_hz': len(window) / (t1 - t0),
        'latency_p50_ms': float(np.percentile(lat, 50)), 'latency_p99_ms': float(np.percentile(lat, 99)),
        'e2e_p50_ms': float(np.percentile(e2e, 50)), 'e2e_p99_ms': float(np.percentile(e2e, 99)),
        'cpu_ms_per_frame': {k: 1e3 * (cpu1[k] - cpu0[k]) / n for k in cpu0},
        'versions_applied': (max(versions) - min(versions)) if versions else 0,
    }


def per_predicted(r: dict) -> float:
    """Perception CPU per frame it actually classified (dropped frames cost it nothing)."""
    c = r['cpu_ms_per_frame'].get('perception', float('nan'))
    return c * r['frames'] / r['predicted'] if r['predicted'] else float('nan')


def table(results: list[dict], markdown: bool) -> str:
    """CPU ms/frame: CPU seconds of the process in the window / camera frames in the window."""
    head = ['arch', 'mode', 'frames', 'dropped %', 'lat p50 ms', 'lat p99 ms', 'e2e p50 ms',
            'e2e p99 ms', 'CPU ms/frame perception', 'CPU ms/predicted frame perception',
            'CPU ms/frame adaptation', 'CPU ms/frame camera', 'deltas applied']
    rows = []
    for r in results:
        c = r['cpu_ms_per_frame']
        rows.append([r['arch'], r['mode'], str(r['frames']), f"{r['dropped_pct']:.1f}",
                     f"{r['latency_p50_ms']:.2f}", f"{r['latency_p99_ms']:.2f}",
                     f"{r['e2e_p50_ms']:.2f}", f"{r['e2e_p99_ms']:.2f}",
                     f"{c.get('perception', float('nan')):.2f}",
                     f"{per_predicted(r):.2f}",
                     f"{c['adaptation']:.2f}" if 'adaptation' in c else '-',
                     f"{c.get('camera', float('nan')):.2f}", str(r['versions_applied'])])
    by = {(r['arch'], r['mode']): r for r in results}
    for arch in dict.fromkeys(r['arch'] for r in results):
        base = by.get((arch, 'none'))
        if base is None:
            continue
        for mode in ('async', 'sync'):
            r = by.get((arch, mode))
            if r is None:
                continue

            def ratio(key, sub=None):
                a = r[key][sub] if sub else r[key]
                b = base[key][sub] if sub else base[key]
                return f'{a / b:.2f}x' if b and np.isfinite(a) and np.isfinite(b) else '-'
            rows.append([arch, f'{mode}/none', '', '', ratio('latency_p50_ms'), ratio('latency_p99_ms'),
                         ratio('e2e_p50_ms'), ratio('e2e_p99_ms'),
                         ratio('cpu_ms_per_frame', 'perception'),
                         f'{per_predicted(r) / per_predicted(base):.2f}x', '', '', ''])
    if markdown:
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: '  '.join(x.ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(head), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())['results'], args.markdown))
        return 0
    import torch
    torch.set_num_threads(1)
    from async_ttt_ros.core.training import load_or_train
    out = Path(args.output)
    logs = out.parent / 'bench_live_logs'
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.archs.split(','):
        load_or_train(arch)   # train/cache once here, not in the measured processes
        for mode in args.modes.split(','):
            t = time.monotonic()
            r = run_one(arch, mode, args, logs)
            results.append(r)
            print(f"{arch:16s} {mode:5s}: {r['frames']} frames, dropped {r['dropped_pct']:.1f} %, "
                  f"latency p50 {r['latency_p50_ms']:.2f} / p99 {r['latency_p99_ms']:.2f} ms, "
                  f"cpu/frame {json.dumps({k: round(v, 2) for k, v in r['cpu_ms_per_frame'].items()})} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
    print()
    print(table(results, args.markdown))
    out.write_text(json.dumps({'rate_hz': args.rate, 'measure_s': args.measure, 'method': args.method,
                               'cpus': os.cpu_count(), 'results': results}, indent=1))
    print(f'\nwritten {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
