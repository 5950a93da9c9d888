"""Small pieces every node shares: parameter declaration, rolling statistics, diagnostics, main().

Kept here so each node module reads as its wiring only.
"""
from __future__ import annotations

import collections
import math
import os
import threading
from typing import Callable, Sequence

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

try:
    from rclpy.executors import ExternalShutdownException
except ImportError:  # pragma: no cover - very old rclpy
    class ExternalShutdownException(Exception):
        pass


def declare(node, name: str, default, description: str, *, read_only: bool = True,
            int_range: tuple[int, int] | None = None,
            float_range: tuple[float, float] | None = None, choices: Sequence[str] | None = None):
    """declare_parameter with a ParameterDescriptor (description, range, read-only) and return
    its value. Structural parameters are read-only: changing them at run time would have no
    effect, and a parameter that silently does nothing is worse than none."""
    text = description + (f' One of: {", ".join(choices)}.' if choices else '')
    descriptor = ParameterDescriptor(description=text, read_only=read_only)
    if int_range is not None:
        descriptor.integer_range = [IntegerRange(from_value=int_range[0], to_value=int_range[1], step=1)]
    if float_range is not None:
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(float_range[0]), to_value=float(float_range[1]), step=0.0)]
    value = node.declare_parameter(name, default, descriptor).value
    if choices is not None and value not in choices:
        raise ValueError(f'parameter {name}={value!r}: expected one of {list(choices)}')
    return value


class Rolling:
    """Thread-safe rolling window of float samples with percentiles, plus an event-rate meter."""

    def __init__(self, window: int = 1000):
        self._values: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(float(value))

    def percentiles(self, *qs: float) -> list[float]:
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        if values.size == 0:
            return [math.nan for _ in qs]
        return [float(np.percentile(values, q)) for q in qs]

    def __len__(self) -> int:
        return len(self._values)


class RateMeter:
    """Events per second between two reads (for diagnostics published at a fixed period)."""

    def __init__(self, clock_ns: Callable[[], int]):
        self._now = clock_ns
        self._count = 0
        self._last_count = 0
        self._last_t = clock_ns()
        self._lock = threading.Lock()

    def tick(self, n: int = 1) -> None:
        with self._lock:
            self._count += n

    @property
    def total(self) -> int:
        return self._count

    def rate(self) -> float:
        with self._lock:
            now = self._now()
            dt = (now - self._last_t) * 1e-9
            n = self._count - self._last_count
            self._last_t, self._last_count = now, self._count
        return n / dt if dt > 0 else 0.0


def load_hmac_key(env_name: str, key_file: str) -> bytes | None:
    """The shared HMAC secret for signing/verifying deltas, or None when neither is configured.

    `key_file` (a path, e.g. a file readable only by the robot's service user) wins over
    `env_name` (the name of an environment variable). A configured but empty source is an
    error: silently running unsigned would defeat the point of configuring a key.
    """
    if key_file:
        try:
            with open(key_file, 'rb') as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise RuntimeError(f'hmac_key_file={key_file!r}: cannot read: {exc}') from exc
        if not key:
            raise RuntimeError(f'hmac_key_file={key_file!r} is empty')
        return key
    if env_name:
        key = os.environ.get(env_name, '').encode()
        if not key:
            raise RuntimeError(f'hmac_key_env={env_name!r} but that environment variable is empty')
        return key
    return None


def diagnostic_array(node, name: str, level, message: str, values: dict) -> DiagnosticArray:
    """A DiagnosticArray with one status, as diagnostic_updater would publish it.

    `level` is DiagnosticStatus.OK / WARN / ERROR / STALE."""
    status = DiagnosticStatus()
    status.level = level
    status.name = name
    status.message = message
    status.hardware_id = node.get_fully_qualified_name()
    status.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    array = DiagnosticArray()
    array.header.stamp = node.get_clock().now().to_msg()
    array.status = [status]
    return array


def _fmt(value) -> str:
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else f'{value:.3f}'
    return str(value)


def run(node_factory: Callable[[], object],
        on_shutdown: Callable[[object], None] | None = None, args=None) -> int:
    """rclpy.init, build the node, spin until Ctrl-C/SIGTERM, clean up.

    A SingleThreadedExecutor for every node: their callbacks are all short (the adapter learns
    on a thread of its own), and rclpy's MultiThreadedExecutor cost perception about a third of
    its CPU per frame in bookkeeping. `on_shutdown(node)` runs once whatever ends the spin (e.g.
    the monitor writes its report).

    Once the node is built, SIGINT/SIGTERM only set a flag that the spin loop checks between
    callbacks (stop_signals.py): a KeyboardInterrupt raised inside a callback could leave a lock
    held that the shutdown path then waits on forever. While the node is being built (which may
    train a model) Ctrl-C still interrupts at once.
    """
    from rclpy.executors import SingleThreadedExecutor

    from ..stop_signals import init_rclpy_without_signal_handlers, stop_on_signals

    init_rclpy_without_signal_handlers(args)
    node = None
    try:
        node = node_factory()
        stop = stop_on_signals()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            # spin() in steps, so that the flag is seen within SPIN_STEP_S of a signal
            while not stop.is_set() and rclpy.ok():
                executor.spin_once(timeout_sec=SPIN_STEP_S)
        except ExternalShutdownException:
            pass
        finally:
            executor.shutdown(timeout_sec=1.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            if on_shutdown is not None:
                on_shutdown(node)
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


SPIN_STEP_S = 0.1
