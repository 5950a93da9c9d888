"""QoS profiles of the graph, in one place so every node (and test) agrees on them.

Why these choices (see docs/architecture.md, "Topics / services"):
- images: SensorDataQoS semantics (REP-2003) but keep last 1: perception always works on the
  newest frame and never builds a backlog. rclpy's qos_profile_sensor_data keeps 5.
- latents: best effort, keep last 5: the adapter may drop, perception never waits on it.
- predictions / ground truth: reliable, so evaluation sees every frame that was processed.
- adaptation status: latched (transient local), a late subscriber sees the last one at once.

Also the Humble/Jazzy+ import shim for QoS event callbacks (`rclpy.qos_event` was renamed
`rclpy.event_handler` after Humble).
"""
from __future__ import annotations

from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)

try:  # Jazzy and later
    from rclpy.event_handler import SubscriptionEventCallbacks  # noqa: F401
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks  # noqa: F401

try:
    from rclpy.qos_overriding_options import QoSOverridingOptions  # noqa: F401
except ImportError:  # pragma: no cover - present since Galactic
    QoSOverridingOptions = None

try:  # raised when an RMW does not implement an event type (e.g. message_lost)
    from rclpy.exceptions import UnsupportedEventTypeError  # noqa: F401
except ImportError:  # pragma: no cover
    class UnsupportedEventTypeError(Exception):
        pass


def image_qos(depth: int = 1) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def latents_qos(depth: int = 5) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def prediction_qos(depth: int = 10) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def ground_truth_qos(depth: int = 100) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def status_qos() -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def diagnostics_qos() -> QoSProfile:
    # Same as the diagnostic_updater publisher (default QoS, depth 10).
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def clock_qos() -> QoSProfile:
    # rclpy's TimeSource subscribes to /clock with ClockQoS semantics: best effort, keep last 1.
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                      reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def image_overrides():
    """Let users override the image subscription's reliability/history/depth with parameters
    (`qos_overrides./image.subscription.reliability` ...), as ros2/demos shows."""
    if QoSOverridingOptions is None:
        return None
    return QoSOverridingOptions.with_default_policies()
