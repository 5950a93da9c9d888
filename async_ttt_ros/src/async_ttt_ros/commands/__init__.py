"""Subcommands of `async-ttt` (see async_ttt_ros.cli): one module per command."""
