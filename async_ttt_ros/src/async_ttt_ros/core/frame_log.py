"""FrameLog: the per-frame record of a live evaluation, in compact arrays.

A monitor on a robot runs for hours: at 30 Hz that is ~100k frames an hour. Python lists of
floats and tuples cost ~0.75 kB per frame and have to be converted to arrays for every summary;
here a frame costs 8 bytes per track plus 9 for its ground truth and latencies, and summaries
are numpy views. Corruption schedules are kept as segments (a new entry only when the
corruption or severity changes), not per frame.
"""
from __future__ import annotations

import math

import numpy as np


class GrowingArray:
    """A 1-D numpy array with amortised O(1) append; `view()` is the filled part (no copy)."""

    def __init__(self, dtype, fill=0, initial: int = 1024):
        self._data = np.full(initial, fill, dtype=dtype)
        self._fill = fill
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, value) -> int:
        if self._size == len(self._data):
            grown = np.full(2 * len(self._data), self._fill, dtype=self._data.dtype)
            grown[:self._size] = self._data
            self._data = grown
        self._data[self._size] = value
        self._size += 1
        return self._size - 1

    def __setitem__(self, index: int, value) -> None:
        if not 0 <= index < self._size:
            raise IndexError(f'index {index} outside 0..{self._size - 1}')
        self._data[index] = value

    def view(self) -> np.ndarray:
        return self._data[:self._size]


class Track:
    """One prediction stream's outcome per frame: correct 1/0, NaN = no prediction (yet)."""

    def __init__(self, name: str):
        self.name = name
        self.correct = GrowingArray(np.float32, fill=np.nan)
        self.versions = GrowingArray(np.int32, fill=-1)
        self.scored = 0
        self.right = 0            # running count of correct predictions: O(1) overall accuracy

    def add_frame(self) -> None:
        self.correct.append(np.nan)
        self.versions.append(-1)

    def score(self, row: int, correct: bool, version: int) -> None:
        before = self.correct.view()[row]
        if math.isnan(before):
            self.scored += 1
        else:
            self.right -= int(before)
        self.right += int(correct)
        self.correct[row] = 1.0 if correct else 0.0
        self.versions[row] = version

    def is_scored(self, row: int) -> bool:
        return not math.isnan(self.correct.view()[row])

    def accuracy(self, last: int | None = None) -> float:
        if not last:
            return self.right / self.scored if self.scored else math.nan
        values = self.correct.view()[-last:]
        values = values[np.isfinite(values)]
        return float(values.mean(dtype=np.float64)) if values.size else math.nan


class FrameLog:
    """Ground truths in arrival order, the tracks scored against them, and latencies."""

    def __init__(self, track_names=('adapted', 'source')):
        self.frame_index = GrowingArray(np.int64, fill=-1)
        self.segments: list[dict] = []      # {start, end, corruption, severity}, contiguous
        self.tracks = {name: Track(name) for name in track_names}
        self.e2e_ms = GrowingArray(np.float32, fill=np.nan)
        self.perception_ms = GrowingArray(np.float32, fill=np.nan)

    def __len__(self) -> int:
        return len(self.frame_index)

    def add_truth(self, frame_index: int, corruption: str, severity: int) -> int:
        """A new ground truth; returns its row."""
        row = self.frame_index.append(frame_index)
        last = self.segments[-1] if self.segments else None
        if last is not None and last['corruption'] == corruption and last['severity'] == severity:
            last['end'] = row + 1
        else:
            self.segments.append({'start': row, 'end': row + 1, 'corruption': corruption,
                                  'severity': severity})
        for track in self.tracks.values():
            track.add_frame()
        return row

    def add_latency(self, e2e_ms: float, perception_ms: float) -> None:
        self.e2e_ms.append(e2e_ms)
        self.perception_ms.append(perception_ms)

    def segment_list(self) -> list[dict]:
        return [dict(s) for s in self.segments]
