"""`async-ttt train`: train (or load from the cache) the source model and print its accuracy."""
from __future__ import annotations

import argparse
import json
import sys

HELP = 'train the source model on Fashion-MNIST (cached by config) and print clean test accuracy'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--arch', default='fmnist_cnn', choices=['fmnist_cnn', 'camera_resnet18'])
    parser.add_argument('--tap', default=None, help='split point (default: the arch default)')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cache-dir', default=None,
                        help='checkpoint cache '
                             '(default: $ASYNC_TTT_CACHE or ~/.cache/async_ttt_ros)')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch CPU threads for evaluation (training always uses one, so the '
                             'checkpoint is reproducible bit for bit; default 2)')
    parser.add_argument('--retrain', action='store_true', help='ignore a cached checkpoint')
    parser.add_argument('--json', action='store_true', help='print the model info as JSON')


def run(args: argparse.Namespace) -> int:
    import torch

    from async_ttt_ros.core.data import DatasetMissingError, load_fashion_mnist
    from async_ttt_ros.core.training import evaluate_accuracy, load_or_train

    if args.threads < 1:
        print('--threads must be >= 1', file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        model = load_or_train(args.arch, args.tap, args.epochs, args.seed, args.cache_dir,
                              log=lambda m: print(m, file=sys.stderr),
                              progress=sys.stderr.isatty(),   # no bar spam in CI logs
                              retrain=args.retrain)
    except DatasetMissingError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    info = model.info()
    if args.arch == 'fmnist_cnn':
        acc = model.meta.get('clean_accuracy')
        if acc is None:  # cache written by an older version: measure it now
            x, y = load_fashion_mnist('test')
            acc = evaluate_accuracy(model, x, y)
        info['clean_accuracy'] = acc
        info['checkpoint'] = model.meta.get('checkpoint')
        if not args.json:
            print(f'{args.arch} (tap {model.tap}, epochs {args.epochs}, seed {args.seed}): '
                  f'clean test accuracy {acc * 100:.2f} %  [{model.meta.get("checkpoint")}]')
    elif not args.json:
        print(f'{args.arch} (tap {model.tap}): untrained weights (pretrained=False); '
              f'latents {tuple(model.latent_shape)}')
    if args.json:
        print(json.dumps(info, indent=2))
    return 0
