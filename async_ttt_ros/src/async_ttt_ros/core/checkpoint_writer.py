"""Checkpoint the served model on a thread of its own, so a slow disk never delays a frame.

Perception serves deltas on the same executor thread that classifies images. Writing the
checkpoint there (torch.save + fsync: ~1.5 ms on this VM's disk, tens of ms on a robot's SD card)
would hold up the next frame. The service asks for a write and returns; this writer snapshots the
newest served state and writes it atomically. Requests that arrive while a write runs collapse
into one more write of the then newest state: the file always ends at the latest version, and
never holds a half-written one (see core.atomic). A crash between an accepted delta and its write
leaves the previous complete checkpoint.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path


class CheckpointWriter:
    def __init__(self, save: Callable[[Path], object], path: str | Path,
                 on_error: Callable[[Exception], None]):
        self._save, self._path, self._on_error = save, Path(path), on_error
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._dirty = False     # a write was asked for and has not started yet
        self._closed = False
        self.writes = 0
        self._thread = threading.Thread(target=self._loop, name='checkpoint-writer', daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for the current served state to be written. Never blocks on the disk."""
        with self._lock:
            if self._closed:
                return
            self._dirty = True
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is pending, stop the thread; True if it finished within `timeout`."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._wake.wait()
                if not self._dirty:     # closed with nothing pending
                    return
                self._dirty = False
            try:
                self._save(self._path)
                self.writes += 1
            except Exception as exc:  # noqa: BLE001 - reported, the next request retries
                self._on_error(exc)
