#!/usr/bin/env python3
"""`make demo`: the whole async TTA graph on a drifting simulated camera, with a live status line.

Starts sim_camera_node, perception_node, adaptation_node and monitor_node as four separate
processes that read the same parameter file (config/sim_pipeline.yaml, `--ros-args
--params-file`), or `ros2 launch async_ttt_ros sim_pipeline.launch.py` when a ROS install with
the package is available. Runs for --duration seconds, prints rate / latency / accuracy / model
version every few seconds, then stops the graph (SIGINT) and leaves report.json + plot.png in
--output-dir (written by monitor_node).

The comparison is honest by construction: perception publishes, for every frame, the prediction
of the served (adapted) model AND of a frozen copy of the source model (prediction_source), and
the monitor scores both against the same ground truth.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'async_ttt_ros'
CONFIG = PACKAGE / 'config' / 'sim_pipeline.yaml'
FASTDDS_PROFILE = PACKAGE / 'config' / 'fastdds_large_images.xml'
NODES = ('perception_node', 'adaptation_node', 'monitor_node', 'sim_camera_node')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--duration', type=float, default=60.0, help='seconds of streaming (default 60)')
    p.add_argument('--output-dir', default='results/demo', help='report.json + plot.png go here')
    p.add_argument('--config', default=str(CONFIG), help='ros__parameters yaml for all nodes')
    p.add_argument('--method', default=None, help='adaptation method (overrides the config)')
    p.add_argument('--schedule', default=None, help='drift schedule (overrides the config)')
    p.add_argument('--rate', type=float, default=None, help='camera rate in Hz (overrides)')
    p.add_argument('--status-every', type=float, default=5.0, help='seconds between status lines')
    p.add_argument('--processes', action='store_true',
                   help='start the four nodes as processes even if `ros2 launch` is available')
    p.add_argument('--domain-id', type=int, default=None,
                   help='ROS_DOMAIN_ID (default: $ROS_DOMAIN_ID, else a random one in 1..100)')
    return p.parse_args(argv)


def ros_environment(domain_id: int) -> dict[str, str]:
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    if env.get('ROS_AUTOMATIC_DISCOVERY_RANGE'):
        env.pop('ROS_LOCALHOST_ONLY', None)
    env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(FASTDDS_PROFILE))
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env['PYTHONUNBUFFERED'] = '1'
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def write_overrides(args, path: Path) -> Path:
    """Command-line overrides as a second parameter file, keyed like the config's node sections.

    (A plain `-p name:=value` lands in the `/**` section and loses against `/**/<node>` keys.)
    """
    import yaml
    nodes: dict[str, dict] = {n: {} for n in NODES}
    nodes['monitor_node']['output_dir'] = str(Path(args.output_dir).resolve())
    if args.method:
        nodes['adaptation_node']['method'] = args.method
    if args.schedule:
        nodes['sim_camera_node']['schedule'] = args.schedule
    if args.rate:
        nodes['sim_camera_node']['rate'] = float(args.rate)
    path.write_text(yaml.safe_dump({f'/**/{n}': {'ros__parameters': p} for n, p in nodes.items() if p}))
    return path


def merged_config(config: Path, override_file: Path, path: Path) -> Path:
    """config + overrides in one file (for `ros2 launch`, which takes a single config)."""
    import yaml
    doc = yaml.safe_load(config.read_text()) or {}
    for key, section in (yaml.safe_load(override_file.read_text()) or {}).items():
        doc.setdefault(key, {'ros__parameters': {}})['ros__parameters'].update(section['ros__parameters'])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ros2_launch_available() -> bool:
    if shutil.which('ros2') is None:
        return False
    probe = subprocess.run(['ros2', 'pkg', 'prefix', 'async_ttt_ros'], capture_output=True, text=True)
    return probe.returncode == 0


def start(cmd: list[str], env, log_path: Path) -> subprocess.Popen:
    log = open(log_path, 'w')   # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc (Linux), None when it is gone."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def interrupt(procs: dict[str, subprocess.Popen], timeout: float = 20.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class StatusListener:
    """Collects /diagnostics of the graph in this process (the live status line)."""

    def __init__(self, domain_id: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('demo_status', context=self.context)
        self.latest: dict[str, dict[str, str]] = {}
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        from async_ttt_ros_interfaces.srv import GetAdaptableState
        self.state_client = self.node.create_client(GetAdaptableState, 'get_adaptable_state')

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            self.latest[status.name.split(':')[0]] = {kv.key: kv.value for kv in status.values}

    def spin(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=min(0.1, max(0.0, deadline - time.monotonic())))

    def line(self, elapsed: float) -> str:
        cam = self.latest.get('sim_camera_node', {})
        per = self.latest.get('perception_node', {})
        mon = self.latest.get('monitor_node', {})
        ada = self.latest.get('adaptation_node', {})

        def f(d, k, scale=1.0, fmt='{:.1f}'):
            try:
                return fmt.format(float(d[k]) * scale)
            except (KeyError, ValueError):
                return '-'
        return (f"[{elapsed:5.0f} s] camera {cam.get('frames_published', '-')} frames | "
                f"perception {f(per, 'rate_hz')} Hz, latency p50 {f(per, 'latency_p50_ms', fmt='{:.2f}')}"
                f"/p99 {f(per, 'latency_p99_ms', fmt='{:.2f}')} ms, model v{per.get('model_version', '-')} | "
                f"accuracy (last window): adapted "
                f"{f(mon, 'accuracy_window', 100)} % vs frozen {f(mon, 'source_accuracy_window', 100)} % | "
                f"adapter steps {ada.get('steps', '-')}, deltas {ada.get('deltas_accepted', '-')}"
                f"/{ada.get('deltas_sent', '-')}, dropped {mon.get('dropped', '-')}")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


def ensure_source_model(config: Path) -> None:
    """Train (or load) the source model once here, before four processes would race to do it."""
    import torch
    import yaml
    torch.set_num_threads(1)
    from async_ttt_ros.core.training import load_or_train
    params = (yaml.safe_load(config.read_text()) or {}).get('/**', {}).get('ros__parameters', {})
    model = load_or_train(params.get('arch', 'fmnist_cnn'), params.get('tap') or None,
                          epochs=int(params.get('train_epochs', 2)), seed=int(params.get('seed', 0)))
    acc = model.meta.get('clean_accuracy')
    print(f'source model {model.arch}: clean test accuracy '
          f'{acc * 100:.1f} %' if acc is not None else f'source model {model.arch}: untrained')


def main(argv=None) -> int:
    args = parse_args(argv)
    config = Path(args.config).resolve()
    out_dir = Path(args.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ('report.json', 'plot.png'):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / stale).unlink()
    domain = args.domain_id if args.domain_id is not None else int(
        os.environ.get('ROS_DOMAIN_ID') or random.randint(1, 100))
    env = ros_environment(domain)
    ensure_source_model(config)
    logs = out_dir / 'logs'
    logs.mkdir(exist_ok=True)
    override_file = write_overrides(args, logs / 'overrides.yaml')
    listener = StatusListener(domain)
    procs: dict[str, subprocess.Popen] = {}
    use_launch = not args.processes and ros2_launch_available()
    print(f'ROS_DOMAIN_ID={domain}; config {config}; output {out_dir}; '
          f'{"ros2 launch" if use_launch else "4 processes"}; logs in {logs}')
    try:
        if use_launch:
            launch_config = merged_config(config, override_file, logs / 'launch_config.yaml')
            procs['launch'] = start(['ros2', 'launch', 'async_ttt_ros', 'sim_pipeline.launch.py',
                                     f'config:={launch_config}', f'output_dir:={out_dir}',
                                     f'fastdds_profile:={env["FASTDDS_DEFAULT_PROFILES_FILE"]}'],
                                    env, logs / 'launch.log')
        else:
            for name in NODES:
                if name == 'sim_camera_node':
                    # Frames before perception serves would be scored as dropped: wait for it.
                    deadline = time.monotonic() + 120.0
                    while not listener.state_client.service_is_ready() and time.monotonic() < deadline:
                        listener.spin(0.2)
                cmd = [sys.executable, '-m', f'async_ttt_ros.nodes.{name}', '--ros-args',
                       '--params-file', str(config), '--params-file', str(override_file)]
                procs[name] = start(cmd, env, logs / f'{name}.log')
        t0 = time.monotonic()
        cpu0 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        while time.monotonic() - t0 < args.duration:
            listener.spin(min(args.status_every, args.duration - (time.monotonic() - t0)))
            print(listener.line(time.monotonic() - t0), flush=True)
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                print(f'process(es) exited early: {dead}; see {logs}', file=sys.stderr)
                break
        cpu = {n: (cpu_seconds(p.pid) or 0.0) - (cpu0[n] or 0.0) for n, p in procs.items()}
        elapsed = time.monotonic() - t0
    except KeyboardInterrupt:
        elapsed, cpu = time.monotonic() - t0 if 't0' in locals() else 0.0, {}
    finally:
        interrupt(procs)
        listener.close()
    report_path = out_dir / 'report.json'
    if not report_path.is_file():
        print(f'no report written; see the logs in {logs}', file=sys.stderr)
        return 1
    report = json.loads(report_path.read_text())
    summary = report.get('summary', {})
    adapted, frozen = summary.get('accuracy'), summary.get('source_accuracy')
    print('\n=== demo result ===')
    print(f"frames {summary.get('frames')} in {elapsed:.0f} s, predicted {summary.get('predicted')}, "
          f"dropped {summary.get('dropped')}")
    print(f"end-to-end latency p50 {summary.get('e2e_latency_p50_ms') or float('nan'):.2f} ms, "
          f"p99 {summary.get('e2e_latency_p99_ms') or float('nan'):.2f} ms; perception p50 "
          f"{summary.get('perception_latency_p50_ms') or float('nan'):.2f} ms; "
          f"model version {summary.get('model_version')}")
    if cpu:
        print('CPU seconds: ' + ', '.join(f'{n} {s:.1f}' for n, s in cpu.items()))
    if adapted is not None and frozen is not None:
        verdict = 'beats' if adapted > frozen else 'does NOT beat'
        print(f'online accuracy: adapted {adapted * 100:.1f} % vs frozen source {frozen * 100:.1f} % '
              f'({(adapted - frozen) * 100:+.1f} points): the adapted model {verdict} the frozen one')
    print(f'report: {report_path}\nplot:   {out_dir / "plot.png"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
