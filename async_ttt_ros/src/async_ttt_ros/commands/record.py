"""`async-ttt record`: record graph topics into a rosbag2 (for machines without `ros2 bag`).

Where `ros2 bag record` exists, prefer it. This recorder exists because the PyPI ROS wheels have
no ros2cli/rosbag2; it does what rosbag2's recorder does for our graph: it waits for each topic
to appear, subscribes with the QoS its publishers offer (best effort if any publisher is best
effort, transient local only if all are, so late-joining latched status is still received),
and writes the raw serialized bytes (no deserialize/serialize round trip) with the receive time
as the bag timestamp.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from .. import bags
from ..stop_signals import init_rclpy_stopped_by_signals

HELP = 'record topics of the running graph into a rosbag2 (mcap or sqlite3)'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('-o', '--output', required=True, help='new bag directory')
    parser.add_argument('topics', nargs='*', default=list(bags.DEFAULT_RECORD_TOPICS),
                        help='topics to record (relative names resolve in the node namespace; '
                             f'default: {" ".join(bags.DEFAULT_RECORD_TOPICS)})')
    parser.add_argument('--storage', choices=bags.STORAGES, default='mcap')
    parser.add_argument('--version', type=int, choices=bags.VERSIONS, default=bags.DEFAULT_VERSION,
                        help='bag metadata version: 8 for Humble, 9 for Jazzy/Kilted (default)')
    parser.add_argument('--duration', type=float, default=None,
                        help='stop after this many seconds (default: until Ctrl-C)')
    parser.add_argument('--max-messages', type=int, default=None,
                        help='stop after this many messages in total')
    parser.add_argument('--namespace', default='', help='namespace of the recorder node')
    parser.add_argument('--quiet', action='store_true')


def _resolve(topic: str, namespace: str) -> str:
    if topic.startswith('/'):
        return topic
    ns = '/' + namespace.strip('/') if namespace.strip('/') else ''
    return f'{ns}/{topic}'


def _import_msg_class(msgtype: str):
    pkg, kind, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{pkg}.{kind}'), name)


def _adapted_qos(infos, fallback: bags.QosSpec) -> tuple[bags.QosSpec, list[bags.QosSpec]]:
    """Subscription QoS compatible with every publisher, and the publishers' offered profiles."""
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy
    offered = [bags.QosSpec(
        reliable=i.qos_profile.reliability == ReliabilityPolicy.RELIABLE,
        transient_local=i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL,
        depth=max(1, int(i.qos_profile.depth or 1))) for i in infos]
    if not offered:
        return fallback, []
    reliable = all(q.reliable for q in offered)
    latched = all(q.transient_local for q in offered)
    depth = max(fallback.depth, max(q.depth for q in offered), 10)
    return bags.QosSpec(reliable=reliable, transient_local=latched, depth=depth), offered


class Recorder:
    """Subscribes to the wanted topics as their publishers appear and writes raw messages."""

    def __init__(self, node, writer, typestore, topics: list[str], log):
        self.node, self.writer, self.typestore, self.log = node, writer, typestore, log
        self.pending = list(dict.fromkeys(topics))
        self.subscriptions = {}
        self.connections = {}
        self.counts: dict[str, int] = {}
        self.total = 0
        self.node.create_timer(0.1, self.discover)
        self.discover()

    def discover(self) -> None:
        if not self.pending:
            return
        graph = dict(self.node.get_topic_names_and_types())
        for topic in list(self.pending):
            types = graph.get(topic)
            if not types:
                continue
            msgtype = types[0]
            self.pending.remove(topic)
            if len(types) > 1:
                self.log(f'{topic}: several types {types}; recording {msgtype}')
            try:
                cls = _import_msg_class(msgtype)
            except (ImportError, AttributeError, ValueError) as exc:
                self.log(f'{topic}: cannot import {msgtype} ({exc}); not recorded')
                continue
            if not bags.register_msg_type(self.typestore, msgtype):
                self.log(f'{topic}: no .msg definition of {msgtype} found; not recorded')
                continue
            infos = self.node.get_publishers_info_by_topic(topic)
            qos, offered = _adapted_qos(infos, bags.default_qos(topic, msgtype))
            conn = bags.add_topic(self.writer, self.typestore, topic, msgtype, offered or [qos])
            self.connections[topic] = conn
            self.counts[topic] = 0
            self.subscriptions[topic] = self.node.create_subscription(
                cls, topic, lambda data, t=topic: self.write(t, data), qos.to_rclpy(), raw=True)
            self.log(f'recording {topic} [{msgtype}] '
                     f'({"reliable" if qos.reliable else "best effort"}'
                     f'{", transient local" if qos.transient_local else ""})')

    def write(self, topic: str, data: bytes) -> None:
        self.writer.write(self.connections[topic], self.node.get_clock().now().nanoseconds, data)
        self.counts[topic] += 1
        self.total += 1


def _drain(executor, recorder: Recorder, quiet_s: float = 0.1, limit_s: float = 2.0) -> None:
    """After a stop signal, take what DDS has already delivered before closing the bag.

    A signal sent right after the last message was published (a launch shutting down, a script
    that saw the message itself) would otherwise leave it in the subscription's queue. Spins
    until nothing arrived for `quiet_s`, at most `limit_s` so a busy topic cannot hold the stop.
    """
    deadline = time.monotonic() + limit_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        before = recorder.total
        executor.spin_once(timeout_sec=0.02)
        if recorder.total != before:
            quiet_since = time.monotonic()


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    topics = [_resolve(t, args.namespace) for t in args.topics]
    try:
        typestore = bags.make_typestore(args.version)
        writer = bags.open_writer(args.output, args.storage, args.version)
    except bags.BagError as exc:
        print(f'async-ttt record: {exc}', file=sys.stderr)
        return 2

    stop = init_rclpy_stopped_by_signals()   # the loops below finish and close the bag
    node = rclpy.create_node('async_ttt_recorder', namespace=args.namespace or None)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    recorder = Recorder(node, writer, typestore, topics, log)
    log(f'recording into {args.output} ({args.storage}, version {args.version}); '
        f'waiting for: {" ".join(recorder.pending)}')
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if args.max_messages is not None and recorder.total >= args.max_messages:
                break
            executor.spin_once(timeout_sec=0.05)
        if stop.is_set():
            _drain(executor, recorder)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        writer.close()          # metadata.yaml + mcap summary: the bag is complete
        node.destroy_node()
        executor.shutdown()
        if rclpy.ok():
            rclpy.shutdown()
    summary = ', '.join(f'{t}: {n}' for t, n in recorder.counts.items()) or 'no topics found'
    log(f'wrote {args.output}: {summary}')
    if recorder.pending:
        log(f'never published: {" ".join(recorder.pending)}')
    return 0
