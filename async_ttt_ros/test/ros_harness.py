"""Helpers for tests that run real rclpy nodes in separate processes over real DDS.

Every test gets its own ROS_DOMAIN_ID and keeps discovery on localhost, so parallel runs on one
machine (or a developer's running graph) never cross-talk with a test.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PACKAGE_DIR / 'config'
FASTDDS_PROFILE = CONFIG_DIR / 'fastdds_large_images.xml'


def free_domain_id() -> int:
    """A domain id unlikely to be used by another test running at the same time."""
    # 1..100 keeps every participant's ports valid on Linux (domain ids above ~101 overflow).
    return random.Random(os.getpid() * 7919 + time.monotonic_ns()).randint(1, 100)


def ros_env(domain_id: int | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id if domain_id is not None else free_domain_id())
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'   # Jazzy/Kilted
    env.pop('ROS_LOCALHOST_ONLY', None)                  # deprecated after Humble; conflicts
    env['RMW_IMPLEMENTATION'] = env.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(FASTDDS_PROFILE)
    env['PYTHONUNBUFFERED'] = '1'
    env['OMP_NUM_THREADS'] = '1'
    env.update(extra)
    return env


def python_process(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start `python ARGS` (a script path or `-m module`) in its own process group."""
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """Interrupt a process (as Ctrl-C would), wait, kill if needed; return its output."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    out = proc.stdout.read() if proc.stdout else ''
    return out or ''


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: the peer dies without any cleanup, as a crash would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def rclpy_in_domain(domain_id: int):
    """An rclpy context in this test process, on the test's domain, shut down afterwards."""
    import rclpy
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.pop('ROS_LOCALHOST_ONLY', None)
    os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(FASTDDS_PROFILE)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        yield context
    finally:
        context.try_shutdown()


def spin_until(executor, predicate, timeout: float, step: float = 0.05) -> bool:
    """Spin `executor` until predicate() is true or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=step)
    return predicate()
