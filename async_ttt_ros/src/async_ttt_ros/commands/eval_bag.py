"""`async-ttt eval-bag`: offline evaluation from a rosbag2, with the outputs of `async-ttt eval`.

Two modes:
- `--mode rerun` (default): the recorded images (joined with their GroundTruth by header
  stamp, cropped/downscaled exactly as perception_node does) become a stream, and the same
  methods and modes as `async-ttt eval` run on it through core/protocol.py. On a bag made by
  `make-bag` this reproduces `eval` on the same stream (identical for mode none).
- `--mode recorded`: no model runs; the bag's recorded `prediction` messages are scored against
  its `ground_truth` (joined by header stamp). Frames the perception node never predicted (it
  dropped them) count as wrong in `accuracy` and are excluded from `accuracy_predicted`.

Both write report.json + plot.png (core/report.py) and print the same table as `eval`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import bags

HELP = ('evaluate offline from a rosbag2: rerun methods/modes on its images, or score its '
        'recorded predictions against its ground truth; writes report.json and plot.png')


def _csv(value: str) -> list[str]:
    from .evaluate import _csv as csv
    return csv(value)


def _hparam(value: str):
    from .evaluate import _hparam as hparam
    return hparam(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluate import DEFAULT_METHODS, DEFAULT_MODES
    parser.add_argument('bag', help='bag directory (mcap or sqlite3)')
    parser.add_argument('--mode', choices=('rerun', 'recorded'), default='rerun',
                        help='rerun: evaluate methods on the recorded images (default); '
                             'recorded: score the recorded predictions')
    parser.add_argument('--image-topic', default='image')
    parser.add_argument('--truth-topic', default='ground_truth')
    parser.add_argument('--prediction-topic', default='prediction')
    parser.add_argument('--roi', type=int, nargs=4, default=None, metavar=('X', 'Y', 'W', 'H'),
                        help='image region holding the item, as perception_node\'s roi parameter '
                             '(default: the region make-bag stored, else the centre square)')
    parser.add_argument('--limit', type=int, default=None, help='use only the first N frames')
    # The options of `async-ttt eval` that apply to a recorded stream (same names and meaning).
    parser.add_argument('--methods', type=_csv, default=_csv(DEFAULT_METHODS),
                        help=f'comma-separated methods (default {DEFAULT_METHODS})')
    parser.add_argument('--modes', type=_csv, default=_csv(DEFAULT_MODES),
                        help=f'modes among none,sync,async (default {DEFAULT_MODES})')
    parser.add_argument('--rate', type=float, default=None,
                        help='frame rate in Hz (default: from the recorded stamps)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--adapt-every', type=int, default=None)
    parser.add_argument('--adapt-rate', type=float, default=0.0)
    parser.add_argument('--queue', type=int, default=1, choices=(0, 1))
    parser.add_argument('--window', type=int, default=1000)
    parser.add_argument('--hp', type=_hparam, action='append', default=[],
                        metavar='METHOD.NAME=VALUE')
    parser.add_argument('--arch', default='fmnist_cnn')
    parser.add_argument('--tap', default=None)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--model-seed', type=int, default=0)
    parser.add_argument('--cache-dir', default=None)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default='results/eval_bag')
    parser.add_argument('--no-plot', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--markdown', action='store_true')


def recorded_result(rec: bags.RecordedPredictions, name: str, method: str, window: int):
    """A protocol.RunResult built from recorded predictions, so report/table treat it alike."""
    import numpy as np

    from ..core.protocol import RunResult
    correct = rec.has_prediction & (rec.predicted == rec.labels)
    return RunResult(
        name=name, method=method, mode='recorded', gate=False,
        config={'source': 'recorded predictions joined with ground truth by header stamp',
                'predictions_without_ground_truth': rec.predictions_without_truth},
        correct=correct, predicted=rec.has_prediction.copy(),
        late=np.zeros(len(correct), bool),
        latency_s=rec.latency_ms.astype(np.float64) / 1e3,
        version=rec.model_version, corruption=list(rec.corruption), severity=rec.severity,
        window=window, counts={'versions_seen': int(len(np.unique(rec.model_version)))})


def _recorded_method(path) -> str:
    """The adaptation method named by the last recorded AdaptationStatus, if any."""
    method = 'unknown'
    with bags.open_reader(path) as reader:
        conns = bags.find_connections(reader, 'adaptation_status', bags.STATUS_TYPE)
        if not conns:    # (an empty filter would mean "all messages" to rosbags)
            return method
        for conn, _, raw in reader.messages(connections=conns):
            method = str(reader.deserialize(raw, conn.msgtype).method) or method
    return method


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core import protocol, report
    err = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    torch.set_num_threads(max(1, args.threads))
    if args.window < 1 or (args.limit is not None and args.limit < 1):
        err('error: --window and --limit must be >= 1')
        return 2
    name = Path(args.bag).name
    t0 = time.perf_counter()
    try:
        if args.mode == 'recorded':
            rec = bags.read_predictions(args.bag, args.prediction_topic, args.truth_topic)
            method = _recorded_method(args.bag)
            results = [recorded_result(rec, f'recorded/{method}', method, args.window)]
            schedule = protocol.segments_from_labels(rec.corruption, rec.severity)
            meta_extra = {'frames_with_ground_truth': int(len(rec.labels)),
                          'frames_predicted': int(rec.has_prediction.sum()),
                          'predictions_without_ground_truth': rec.predictions_without_truth}
            config = None
        else:
            from ..core.training import load_or_train
            from ..imaging import Roi
            bags.require_topics(args.bag, [(args.image_topic, bags.IMAGE_TYPE),
                                           (args.truth_topic, bags.GROUND_TRUTH_TYPE)])
            model = load_or_train(args.arch, args.tap, args.epochs, args.model_seed,
                                  args.cache_dir, log=err)
            frames = bags.read_frames(args.bag, args.image_topic, args.truth_topic,
                                      input_shape=tuple(model.input_shape),
                                      roi=Roi(*args.roi) if args.roi else None, limit=args.limit)
            stream = bags.BagStream(frames, name)
            rate = args.rate or stream.rate_hz() or 30.0
            hparams: dict[str, dict] = {}
            for method, key, value in args.hp:
                hparams.setdefault(method, {})[key] = value
            config = protocol.ProtocolConfig(
                rate_hz=rate, batch_size=args.batch_size, adapt_every=args.adapt_every,
                adapt_rate_hz=args.adapt_rate, queue_size=args.queue, window=args.window)
            config.validate()
            results = protocol.evaluate(model, stream, args.methods, args.modes, config=config,
                                        hparams=hparams, progress=not args.no_progress, log=err)
            schedule = stream.schedule()
            meta_extra = {'frames': len(stream), 'images_without_ground_truth':
                          frames.unmatched_images, 'rate_hz': rate, 'model': model.info()}
    except bags.BagError as exc:     # missing bag, topics or types: bad input
        err(f'error: {exc}')
        return 2
    except ValueError as exc:
        err(f'error: {exc}')
        return 2
    wall = time.perf_counter() - t0
    deficits = protocol.window_deficits(results) if args.mode == 'rerun' else {}
    meta = {'command': 'async-ttt eval-bag ' + ' '.join(sys.argv[2:]),
            'bag': str(Path(args.bag).resolve()), 'mode': args.mode,
            'protocol': config.to_dict() if config else None,
            'torch_threads': torch.get_num_threads(), 'wall_s': round(wall, 1), **meta_extra}
    paths = report.write_report(results, args.out, schedule, window=args.window, meta=meta,
                                extra={'window_deficits_vs_source': deficits},
                                plot=not args.no_plot, title=f'bag {name} ({args.mode})')
    print(report.format_table(results, deficits, markdown=args.markdown))
    print(f'\nwrote {", ".join(str(p) for p in paths.values())}  ({wall:.0f} s)')
    return 0
