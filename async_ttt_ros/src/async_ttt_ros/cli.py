"""`async-ttt`: the command line of async_ttt_ros.

Each subcommand lives in its own module under `async_ttt_ros.commands` exposing
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily so
`async-ttt train` never pays for importing rclpy, and a command whose optional dependency is
missing fails with its own clear message instead of breaking the whole CLI.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under async_ttt_ros.commands
COMMANDS = {
    'train': 'train',
    'eval': 'evaluate',
    'make-bag': 'make_bag',
    'record': 'record',
    'replay': 'replay',
    'eval-bag': 'eval_bag',
}


def _load(module_name: str):
    return importlib.import_module(f'async_ttt_ros.commands.{module_name}')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='async-ttt',
        description='Asynchronous test-time adaptation for ROS 2 perception.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = _load(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != f'async_ttt_ros.commands.{module_name}':
                raise
            continue  # command not available in this build
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
