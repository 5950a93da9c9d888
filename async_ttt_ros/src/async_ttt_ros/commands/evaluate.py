"""`async-ttt eval`: realistic online evaluation (Alfarra et al. 2024) of TTA methods, ROS-free.

Runs source (mode none) and each method in sync and async mode on the same drifting stream,
prints a table, and writes report.json + plot.png to --out. See core/protocol.py for the
protocol and docs/results.md for measured numbers.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

HELP = ('realistic online evaluation (virtual clock, measured costs) of source/norm/tent/eata/safe '
        'in modes none/sync/async; writes report.json and plot.png')

DEFAULT_METHODS = 'source,norm,tent,eata,safe'
DEFAULT_MODES = 'none,sync,async'


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(',') if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError('expected a comma-separated list')
    return items


def _positive_float(value: str) -> float:
    f = float(value)
    if not f > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, not {value}')
    return f


def _hparam(value: str) -> tuple[str, str, object]:
    """'tent.lr=1e-4' -> ('tent', 'lr', 1e-4); values parsed as int, float, bool or string."""
    try:
        key, raw = value.split('=', 1)
        method, name = key.split('.', 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected METHOD.NAME=VALUE, not {value!r}') from None
    parsed: object = raw
    for conv in (int, float):
        try:
            parsed = conv(raw)
            break
        except ValueError:
            continue
    if raw.lower() in ('true', 'false'):
        parsed = raw.lower() == 'true'
    return method.strip(), name.strip(), parsed


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--stream', default='continual',
                        help='stream schedule (core.streams: continual, gradual, mixed, '
                             'class_correlated, long ...); default continual drift over the '
                             'corruptions at --severity')
    parser.add_argument('--length', type=int, default=10000, help='frames in the stream (default 10000)')
    parser.add_argument('--seed', type=int, default=0, help='stream seed (default 0)')
    parser.add_argument('--severity', type=int, default=5, choices=range(1, 6), metavar='1-5')
    parser.add_argument('--corruptions', type=_csv, default=None,
                        help='comma-separated corruption names (default: the stream default)')
    parser.add_argument('--methods', type=_csv, default=_csv(DEFAULT_METHODS),
                        help=f'comma-separated methods (default {DEFAULT_METHODS}); suffix +rep / '
                             '-rep forces the reputation gate on/off (default: on for safe only)')
    parser.add_argument('--modes', type=_csv, default=_csv(DEFAULT_MODES),
                        help=f'comma-separated modes among none,sync,async (default {DEFAULT_MODES})')
    parser.add_argument('--rate', type=_positive_float, default=30.0, help='frame rate in Hz (default 30)')
    parser.add_argument('--batch-size', type=int, default=64,
                        help='frames per adaptation step (default 64)')
    parser.add_argument('--adapt-every', type=int, default=None,
                        help='sync: one update every K predicted frames (default: --batch-size)')
    parser.add_argument('--adapt-rate', type=float, default=0.0,
                        help='async: adapter steps per second, 0 = back to back (default 0)')
    parser.add_argument('--queue', type=int, default=1, choices=(0, 1),
                        help='frames a busy predictor may hold (1 = keep newest, default; 0 = drop)')
    parser.add_argument('--clock', default='wall', choices=('wall', 'cpu'),
                        help='how compute is measured: wall = time.perf_counter (default), '
                             'cpu = thread CPU time (robust on a shared machine)')
    parser.add_argument('--window', type=int, default=1000, help='frames per accuracy window (default 1000)')
    parser.add_argument('--hp', type=_hparam, action='append', default=[], metavar='METHOD.NAME=VALUE',
                        help='method hyper-parameter, e.g. --hp tent.lr=1e-4 (repeatable)')
    parser.add_argument('--arch', default='fmnist_cnn')
    parser.add_argument('--tap', default=None, help='split point (default: the arch default)')
    parser.add_argument('--epochs', type=int, default=2, help='source model training epochs (cached)')
    parser.add_argument('--model-seed', type=int, default=0, help='source model training seed')
    parser.add_argument('--cache-dir', default=None)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    parser.add_argument('--out', default='results/eval', help='output directory (default results/eval)')
    parser.add_argument('--no-plot', action='store_true', help='skip plot.png')
    parser.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')
    parser.add_argument('--markdown', action='store_true', help='print the table as markdown')


def run(args: argparse.Namespace) -> int:
    import torch

    from async_ttt_ros.core import protocol, report
    from async_ttt_ros.core.data import DatasetMissingError

    err = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.length < 2:
        err('error: --length must be >= 2')
        return 2
    if args.batch_size < 2:
        err('error: --batch-size must be >= 2 (BatchNorm statistics need a batch)')
        return 2
    if args.threads < 1 or args.window < 1:
        err('error: --threads and --window must be >= 1')
        return 2
    torch.set_num_threads(args.threads)
    hparams: dict[str, dict] = {}
    for method, name, value in args.hp:
        hparams.setdefault(method, {})[name] = value
    config = protocol.ProtocolConfig(rate_hz=args.rate, batch_size=args.batch_size,
                                     adapt_every=args.adapt_every, adapt_rate_hz=args.adapt_rate,
                                     queue_size=args.queue, window=args.window,
                                     clock=args.clock)
    try:
        config.validate()
        plan = protocol.plan_runs(args.methods, args.modes)
    except ValueError as exc:
        err(f'error: {exc}')
        return 2
    if not plan:
        err('error: nothing to evaluate')
        return 2
    try:
        from async_ttt_ros.core.streams import make_stream
        from async_ttt_ros.core.training import load_or_train
        model = load_or_train(args.arch, args.tap, args.epochs, args.model_seed, args.cache_dir,
                              log=err)
        stream_kwargs = {'seed': args.seed, 'severity': args.severity}
        if args.corruptions:
            stream_kwargs['corruptions'] = args.corruptions
        stream = make_stream(args.stream, args.length, **stream_kwargs)
    except DatasetMissingError as exc:
        err(f'error: {exc}')
        return 1
    except (ValueError, KeyError) as exc:
        err(f'error: {exc}')
        return 2

    load_before = _loadavg()
    t0 = time.perf_counter()
    try:
        results = protocol.evaluate(model, stream, args.methods, args.modes, config=config,
                                    hparams=hparams, progress=not args.no_progress, log=err)
    except ValueError as exc:
        err(f'error: {exc}')
        return 2
    wall = time.perf_counter() - t0
    deficits = protocol.window_deficits(results)
    schedule = None
    if callable(getattr(stream, 'schedule', None)):
        try:
            schedule = report.normalize_schedule(stream.schedule())
        except (ValueError, TypeError):
            schedule = None
    if not schedule:   # fall back to the frames actually seen
        r0 = results[0]
        schedule = protocol.segments_from_labels(r0.corruption, r0.severity)
    command = 'async-ttt eval ' + ' '.join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == 'eval' else None
    meta = {'command': command,
            'stream': {'schedule': args.stream, 'length': args.length, 'seed': args.seed,
                       'severity': args.severity, 'corruptions': args.corruptions},
            'model': model.info(), 'protocol': config.to_dict(), 'hparams': hparams,
            'torch_threads': torch.get_num_threads(), 'torch_version': torch.__version__,
            'wall_s': round(wall, 1),
            # costs are measured on a possibly shared machine: say how busy it was
            'loadavg_1min': {'before': load_before, 'after': _loadavg()}, 'cpus': os.cpu_count()}
    paths = report.write_report(results, args.out, schedule, window=args.window, meta=meta,
                                extra={'window_deficits_vs_source': deficits},
                                plot=not args.no_plot,
                                title=f'{args.stream} stream, {args.length} frames at {args.rate:g} Hz')
    print(report.format_table(results, deficits, markdown=args.markdown))
    print(f'\nwrote {", ".join(str(p) for p in paths.values())}  ({wall:.0f} s)')
    return 0
