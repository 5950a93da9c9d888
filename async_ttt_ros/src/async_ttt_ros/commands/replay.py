"""`async-ttt replay`: publish a bag's topics with their recorded timing (for machines without
`ros2 bag play`; prefer that where it exists).

Messages are published as the raw CDR bytes stored in the bag (rclpy's `publish(bytes)`), so
replay costs no deserialisation and sends exactly what was recorded. Timing follows the bag's
receive timestamps, scaled by `--rate`, against a monotonic clock (a slow publish delays the
next message, it never shifts the whole schedule). `--clock HZ` publishes /clock with the bag
time so nodes with use_sim_time follow the bag, as `ros2 bag play --clock` does.

QoS: images get SensorDataQoS semantics (best effort); other topics use the profile recorded in
the bag's metadata (offered by the original publisher), else the graph's default for the topic.
"""
from __future__ import annotations

import argparse
import sys
import time

from .. import bags
from ..stop_signals import init_rclpy_stopped_by_signals

HELP = 'publish a rosbag2 with its original timing (rate, loop, start offset, /clock)'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', help='bag directory (mcap or sqlite3)')
    parser.add_argument('--topics', nargs='+', default=None,
                        help='only these topics (default: all; relative names match the tail)')
    parser.add_argument('--rate', type=float, default=1.0, help='playback speed factor (default 1)')
    parser.add_argument('--loop', action='store_true', help='play again from the start when done')
    parser.add_argument('--start-offset', type=float, default=0.0,
                        help='skip the first SECONDS of the bag')
    parser.add_argument('--clock', type=float, nargs='?', const=40.0, default=None, metavar='HZ',
                        help='publish /clock from the bag time at HZ (default 40 when given); '
                             'the bag\'s own /clock topic is then not replayed')
    parser.add_argument('--remap', nargs='+', default=[], metavar='FROM:=TO',
                        help='publish bag topic FROM on TO, e.g. /image:=/camera/image_raw')
    parser.add_argument('--wait-for-subscribers', type=float, default=0.0, metavar='SECONDS',
                        help='before playing, wait up to SECONDS until every replayed topic has '
                             'a subscriber')
    parser.add_argument('--wait-for-all-acked', type=float, default=2.0, metavar='SECONDS',
                        help='at the end, wait up to SECONDS until reliable subscribers have '
                             'acknowledged every message (default 2; 0 = exit at once)')
    parser.add_argument('--delay', type=float, default=0.0,
                        help='sleep SECONDS after creating publishers (discovery) before playing')
    parser.add_argument('--quiet', action='store_true')


def _parse_remaps(items: list[str]) -> dict[str, str]:
    remaps = {}
    for item in items:
        src, sep, dst = item.partition(':=')
        if not sep or not src or not dst:
            raise ValueError(f'bad remap {item!r}; expected FROM:=TO')
        remaps[src if src.startswith('/') else '/' + src] = dst
    return remaps


def _publish_qos(conn) -> bags.QosSpec:
    if conn.msgtype == bags.IMAGE_TYPE:
        return bags.QosSpec(reliable=False, depth=5)   # SensorDataQoS: best effort, keep last 5
    offered = list(getattr(conn.ext, 'offered_qos_profiles', []) or [])
    if offered:
        return bags.QosSpec.from_rosbags(offered[0])
    return bags.default_qos(conn.topic, conn.msgtype)


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from .record import _import_msg_class

    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.rate <= 0:
        print('async-ttt replay: --rate must be positive', file=sys.stderr)
        return 2
    try:
        remaps = _parse_remaps(args.remap)
        reader = bags.open_reader(args.bag)
        reader.open()
    except (ValueError, bags.BagError) as exc:
        print(f'async-ttt replay: {exc}', file=sys.stderr)
        return 2

    conns = list(reader.connections)
    if args.topics:
        conns = [c for c in conns if any(bags.topic_name_matches(c.topic, t) for t in args.topics)]
    if args.clock is not None:
        conns = [c for c in conns if c.topic != '/clock']
    if not conns:
        print(f'async-ttt replay: nothing to play in {args.bag}', file=sys.stderr)
        reader.close()
        return 2

    stop = init_rclpy_stopped_by_signals()   # the loops below finish and close the bag
    node = rclpy.create_node('async_ttt_replay')
    publishers, classes, counts = {}, {}, {}
    for conn in conns:
        topic = remaps.get(conn.topic, conn.topic)
        if conn.id in publishers:
            continue
        try:
            cls = _import_msg_class(conn.msgtype)
        except (ImportError, AttributeError, ValueError) as exc:
            log(f'{conn.topic}: cannot import {conn.msgtype} ({exc}); skipped')
            continue
        qos = _publish_qos(conn)
        # One publisher per (topic, type): several connections of one topic share it.
        key = (topic, conn.msgtype)
        pub = next((publishers[c] for c in publishers if classes[c][0] == key), None)
        if pub is None:
            pub = node.create_publisher(cls, topic, qos.to_rclpy())
        publishers[conn.id] = pub
        classes[conn.id] = (key, cls)
    clock_pub = None
    if args.clock is not None:
        from rosgraph_msgs.msg import Clock
        clock_pub = node.create_publisher(Clock, '/clock', bags.TOPIC_QOS['clock'].to_rclpy())

    def send(conn_id: int, raw: bytes) -> None:
        pub = publishers[conn_id]
        try:
            pub.publish(bytes(raw))
        except TypeError:   # an rclpy without publish(bytes): deserialize once and publish
            from rclpy.serialization import deserialize_message
            pub.publish(deserialize_message(bytes(raw), classes[conn_id][1]))
        counts[pub.topic_name] = counts.get(pub.topic_name, 0) + 1

    def publish_clock(bag_ns: int) -> None:
        from rosgraph_msgs.msg import Clock
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(int(bag_ns), 1_000_000_000)
        clock_pub.publish(msg)

    def sleep_until(target: float, bag_at) -> None:
        """Sleep to `target` (monotonic), publishing /clock on the way when asked."""
        while not stop.is_set():
            now = time.monotonic()
            if now >= target:
                return
            if clock_pub is not None:
                publish_clock(bag_at(now))
                time.sleep(min(target - now, 1.0 / args.clock))
            else:
                time.sleep(min(target - now, 0.1))

    try:
        if args.delay > 0:
            time.sleep(args.delay)
        if args.wait_for_subscribers > 0:
            deadline = time.monotonic() + args.wait_for_subscribers
            unique = {id(p): p for p in publishers.values()}.values()
            while not stop.is_set() and time.monotonic() < deadline:
                if all(p.get_subscription_count() > 0 for p in unique):
                    break
                time.sleep(0.05)
            missing = [p.topic_name for p in unique if p.get_subscription_count() == 0]
            if missing:
                log(f'no subscriber yet on: {" ".join(missing)}; playing anyway')
        start_ns = reader.start_time + int(args.start_offset * 1e9)
        wanted = [c for c in conns if c.id in publishers]
        loops = 0
        while not stop.is_set():
            loops += 1
            t0_wall = time.monotonic()
            t0_bag = None
            for conn, ts, raw in bags.iter_messages(reader, wanted, start_ns):
                if t0_bag is None:
                    t0_bag = ts
                # Bag time at a monotonic instant of this pass (for /clock between messages).
                sleep_until(t0_wall + (ts - t0_bag) / 1e9 / args.rate,
                            lambda now, b=t0_bag, t0=t0_wall: b + int((now - t0) * args.rate * 1e9))
                if stop.is_set():
                    break
                if clock_pub is not None:
                    publish_clock(ts)
                send(conn.id, raw)
            if not args.loop or t0_bag is None:
                break
        # Exiting right after the last publish would drop reliable messages still in flight.
        if args.wait_for_all_acked > 0 and not stop.is_set():
            from rclpy.duration import Duration
            for pub in {id(p): p for p in publishers.values()}.values():
                if hasattr(pub, 'wait_for_all_acked'):   # Humble and later
                    pub.wait_for_all_acked(Duration(nanoseconds=int(args.wait_for_all_acked * 1e9)))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        reader.close()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    log('published ' + ', '.join(f'{t}: {n}' for t, n in counts.items())
        + (f' ({loops} passes through the bag)' if args.loop else ''))
    return 0
