"""rclpy with Ctrl-C / SIGTERM turned into a flag that the spin loop polls.

rclpy's own handlers turn SIGINT into a KeyboardInterrupt, which Python raises wherever the
main thread happens to be, in the middle of a callback included: a lock taken and never
released (the shutdown path then deadlocks on it and is SIGKILLed), a half-written bag, a
report or checkpoint never written. With this, the callback in hand finishes, the loop sees the
flag, and the node or command shuts down through its normal path. Used by every node
(nodes/_common.run) and by `record` and `replay`.
"""
from __future__ import annotations

import signal
import threading


def init_rclpy_without_signal_handlers(args=None) -> None:
    """rclpy.init(args) leaving SIGINT/SIGTERM to Python (and to stop_on_signals)."""
    import rclpy   # here, not at module level: the CLI imports every command to list it
    try:
        from rclpy.signals import SignalHandlerOptions
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except ImportError:  # pragma: no cover - very old rclpy
        rclpy.init(args=args)


def stop_on_signals() -> threading.Event:
    """From now on SIGINT and SIGTERM only set the returned Event (main thread only)."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    return stop


def init_rclpy_stopped_by_signals(args=None) -> threading.Event:
    """rclpy.init without its signal handlers; returns an Event set by SIGINT or SIGTERM."""
    stop = stop_on_signals()
    init_rclpy_without_signal_handlers(args)
    return stop
