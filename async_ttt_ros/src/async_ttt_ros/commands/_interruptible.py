"""rclpy for the bag commands, with Ctrl-C / SIGTERM turned into a flag the command polls.

`record` and `replay` must finish the message in hand and close the bag cleanly when `ros2
launch` or a user stops them, instead of an exception tearing through a write. rclpy's own
signal handlers are therefore not installed.
"""
from __future__ import annotations

import signal
import threading


def init_rclpy_stopped_by_signals() -> threading.Event:
    """rclpy.init without its signal handlers; returns an Event set by SIGINT or SIGTERM."""
    import rclpy   # here, not at module level: the CLI imports every command to list it
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    try:
        from rclpy.signals import SignalHandlerOptions
        rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    except ImportError:  # pragma: no cover - very old rclpy
        rclpy.init()
    return stop
