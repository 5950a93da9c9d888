"""Helpers for tests that run real rclpy nodes in separate processes over real DDS.

Every test gets its own ROS_DOMAIN_ID and keeps discovery on localhost, so parallel runs on one
machine (or a developer's running graph) never cross-talk with a test.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PACKAGE_DIR / 'config'
FASTDDS_PROFILE = CONFIG_DIR / 'fastdds_large_images.xml'


# Domain ids this process holds, oldest first, each with the open lock file that reserves it.
_held_domains: collections.deque[tuple[int, int]] = collections.deque()
_DOMAIN_LOCK_DIR = Path(tempfile.gettempdir()) / 'async_ttt_ros_domains'
# A module-scoped fixture keeps its graph running while later tests start theirs, so an id must
# not come back soon: it is reused only after this many other allocations in this process.
_DOMAIN_REUSE_AFTER = 50


def free_domain_id() -> int:
    """A domain id that no other live test (in this process or another) is using.

    Random picks collided: CI once gave a module-scoped graph and a later test the same id, and
    the later test talked to the wrong perception node. Ids are therefore reserved with an
    advisory lock file per id (released when this process exits) and handed out round-robin.
    1..100 keeps every participant's ports valid on Linux (ids above ~101 overflow).
    """
    _DOMAIN_LOCK_DIR.mkdir(exist_ok=True)
    while len(_held_domains) >= _DOMAIN_REUSE_AFTER:
        _, fd = _held_domains.popleft()
        os.close(fd)                                  # closing the fd releases the flock
    held = {d for d, _ in _held_domains}
    start = random.Random(os.getpid() * 7919 + time.monotonic_ns()).randrange(100)
    for k in range(100):
        domain = 1 + (start + k) % 100
        if domain in held:
            continue
        fd = os.open(_DOMAIN_LOCK_DIR / f'{domain}.lock', os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:                       # another live test process holds it
            os.close(fd)
            continue
        _held_domains.append((domain, fd))
        return domain
    raise RuntimeError('every ROS domain id 1..100 is held by a live test process')


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
