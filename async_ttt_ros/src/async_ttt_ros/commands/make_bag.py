"""`async-ttt make-bag`: write a drift stream as a rosbag2 (camera frames + ground truth).

The bag holds what a robot's recording of the simulated camera would hold: `sensor_msgs/Image`
frames (by default the same 640x480 rgb8 conveyor-belt frames the sim camera publishes, or the
bare 28x28 mono8 items with `--mono8`), a `GroundTruth` per frame with the same header stamp,
and optionally `/clock`. Frames are stamped at the stream rate from `--start-time`, and the bag's
receive timestamps equal the stamps, so `replay` reproduces the rate and eval-bag the stream.
No ROS install is needed (rosbags writes the bag).
"""
from __future__ import annotations

import argparse
import sys

from .. import bags

HELP = 'write a rosbag2 of a drift stream (camera Image frames + GroundTruth [+ /clock])'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('-o', '--output', required=True, help='new bag directory')
    parser.add_argument('--schedule', default='continual',
                        help='drift schedule (continual, gradual, mixed, class_correlated, long)')
    parser.add_argument('--length', type=int, default=1000, help='frames in the stream')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--severity', type=int, default=5, choices=range(1, 6), metavar='1..5')
    parser.add_argument('--corruptions', nargs='+', default=None,
                        help='corruptions to use (default: the schedule\'s own list)')
    parser.add_argument('--rate', type=float, default=30.0, help='frame rate of the stamps, Hz')
    parser.add_argument('--start-time', type=float, default=None,
                        help='stamp of the first frame, seconds since the epoch (default: now)')
    parser.add_argument('--mono8', action='store_true',
                        help='store the bare 28x28 mono8 items instead of camera frames')
    parser.add_argument('--width', type=int, default=640, help='camera frame width')
    parser.add_argument('--height', type=int, default=480, help='camera frame height')
    parser.add_argument('--noise-sigma', type=float, default=2.0,
                        help='camera sensor noise (grey levels); 0 makes frames exactly invertible')
    parser.add_argument('--frame-id', default='camera')
    parser.add_argument('--image-topic', default='/image')
    parser.add_argument('--truth-topic', default='/ground_truth')
    parser.add_argument('--clock', action='store_true', help='also write /clock at each frame')
    parser.add_argument('--storage', choices=bags.STORAGES, default='mcap')
    parser.add_argument('--version', type=int, choices=bags.VERSIONS, default=bags.DEFAULT_VERSION,
                        help='bag metadata version: 8 for Humble, 9 for Jazzy/Kilted (default)')
    parser.add_argument('--no-progress', action='store_true')


def camera_renderer(width: int, height: int, noise_sigma: float, seed: int):
    """28x28 item -> (HxWx3 rgb8 frame, 'rgb8'), exactly as the sim camera composes frames."""
    from ..nodes.scene import SceneComposer
    composer = SceneComposer(width=width, height=height, noise_sigma=noise_sigma, seed=seed)

    def render(item, index):
        return composer.compose(item, index), 'rgb8'
    return render, list(composer.roi)


def run(args: argparse.Namespace) -> int:
    from ..core.streams import make_stream

    try:
        stream = make_stream(args.schedule, args.length, seed=args.seed, severity=args.severity,
                             corruptions=args.corruptions)
    except (ValueError, KeyError) as exc:
        print(f'async-ttt make-bag: {exc}', file=sys.stderr)
        return 2
    render, roi = None, None
    if not args.mono8:
        try:
            render, roi = camera_renderer(args.width, args.height, args.noise_sigma, args.seed)
        except ValueError as exc:
            print(f'async-ttt make-bag: {exc}', file=sys.stderr)
            return 2
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(stream), desc='make-bag', unit='frame', file=sys.stderr)
        except ImportError:
            pass
    start_ns = None if args.start_time is None else int(round(args.start_time * 1e9))
    # Stored in the bag's custom metadata so eval-bag crops the same region perception would.
    custom = {'async_ttt_ros.stream': f'{args.schedule} length={args.length} seed={args.seed} '
                                      f'severity={args.severity}',
              'async_ttt_ros.item_roi': ' '.join(str(v) for v in roi) if roi else ''}
    try:
        summary = bags.write_stream_bag(
            stream, args.output, rate_hz=args.rate, start_ns=start_ns, render=render,
            frame_id=args.frame_id, image_topic=args.image_topic, truth_topic=args.truth_topic,
            clock=args.clock, storage=args.storage, version=args.version,
            progress=bar.update if bar is not None else None, custom_data=custom)
    except bags.BagError as exc:
        print(f'async-ttt make-bag: {exc}', file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    topics = ', '.join(f'{t}: {n}' for t, n in summary.topics.items())
    print(f'wrote {summary.path} ({summary.storage}, version {summary.version}): {topics}; '
          f'{(summary.end_ns - summary.start_ns) / 1e9:.2f} s at {args.rate:g} Hz')
    return 0
