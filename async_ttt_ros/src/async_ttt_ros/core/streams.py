"""Drifting test streams over Fashion-MNIST, deterministic from a seed.

Why pools: corrupting images one frame at a time would make the stream the bottleneck of an
evaluation (and of a 30 Hz camera). Instead every (corruption, severity, split) is corrupted once
for the whole split, vectorised, and cached on disk as a uint8 .npy under
`<cache>/pools/` (memory-mapped when read). A stream is then three small index arrays (image,
corruption, severity per frame); 100k frames cost a few MB and gathering a batch is a fancy-index.
Pools are seeded by (corruption, severity, split) only, so every stream and every process sees the
same corrupted image for the same (image, corruption, severity), like a fixed ImageNet-C set.

Schedules (`make_stream`):
- continual: one block per corruption, in the given order, at `severity` (the TENT/CoTTA protocol)
- gradual: per corruption, severity ramps 1 -> severity -> 1 (CoTTA's gradual setting)
- mixed: an independent random corruption per frame at `severity`
- class_correlated: continual blocks whose frames come in runs of the same class (non-i.i.d.,
  as in RoTTA/LAME): run lengths are geometric with mean `run_length`
- long: >= 100k frames by default; segments of 1k-5k frames with a new corruption and a random
  severity 1..`severity` each (a CCC-like changing stream)
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .corruptions import CORRUPTIONS, DEFAULT_CORRUPTIONS, corrupt
from .data import load_fashion_mnist

SCHEDULES = ('continual', 'gradual', 'mixed', 'class_correlated', 'long')
CLEAN = 'none'                  # pseudo-corruption: the clean image (severity 0)
POOL_VERSION = 1                # bump when corruptions change their output
LONG_DEFAULT_LENGTH = 100_000
_SPLIT_ID = {'test': 0, 'train': 1}


@dataclass
class FrameBatch:
    index: np.ndarray          # int64 [N]: frame indices in the stream
    images: np.ndarray         # uint8 [N,28,28]
    labels: np.ndarray         # int64 [N]
    corruption: list[str]      # [N]
    severity: np.ndarray       # int64 [N] (0 for clean frames)

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class Frame:
    index: int
    image: np.ndarray          # uint8 [28,28]
    label: int
    corruption: str
    severity: int


@dataclass(frozen=True)
class Segment:
    start: int                 # first frame (inclusive)
    end: int                   # last frame + 1
    corruption: str
    severity: int


# ------------------------------------------------------------------------------ corrupted pools

def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get('ASYNC_TTT_CACHE') or Path.home() / '.cache' / 'async_ttt_ros'
    return Path(cache_dir).expanduser()


_pool_memo: dict[tuple[str, str, int, str], np.ndarray] = {}
_pool_lock = threading.Lock()


def pool_seed(corruption: str, severity: int, split: str) -> list[int]:
    return [POOL_VERSION, zlib.crc32(corruption.encode()), int(severity), _SPLIT_ID[split]]


def generate_pool(corruption: str, severity: int, split: str = 'test',
                  chunk: int = 1000) -> np.ndarray:
    """Corrupt a whole split (uint8 [N,28,28]), deterministic from (corruption, severity, split)."""
    images, _ = load_fashion_mnist(split)
    if corruption == CLEAN:
        return np.array(images)
    rng = np.random.default_rng(pool_seed(corruption, severity, split))
    out = np.empty_like(images)
    for i in range(0, len(images), chunk):     # bounded memory: the float work is chunked
        out[i:i + chunk] = corrupt(images[i:i + chunk], corruption, severity, rng)
    return out


def load_pool(corruption: str, severity: int, split: str = 'test',
              cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The corrupted split from the disk cache (memory-mapped), generating it once if needed."""
    if corruption != CLEAN:
        if corruption not in CORRUPTIONS:
            raise ValueError(f'unknown corruption {corruption!r}; choose from {list(CORRUPTIONS)}')
        if not 1 <= int(severity) <= 5:
            raise ValueError(f'severity must be in 1..5, not {severity}')
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'test' or 'train', not {split!r}")
    if corruption == CLEAN:
        return load_fashion_mnist(split)[0]
    root = _cache_root(cache_dir)
    key = (str(root), corruption, int(severity), split)
    with _pool_lock:
        if key in _pool_memo:
            return _pool_memo[key]
    directory = root / 'pools' / f'v{POOL_VERSION}' / split
    path = directory / f'{corruption}-s{int(severity)}.npy'
    expected_len = len(load_fashion_mnist(split)[1])
    pool = _try_load(path, expected_len)
    if pool is None:
        directory.mkdir(parents=True, exist_ok=True)
        # one process generates, concurrent ones wait and then read its file
        with open(directory / f'{corruption}-s{int(severity)}.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                pool = _try_load(path, expected_len)
                if pool is None:
                    data = generate_pool(corruption, int(severity), split)
                    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix='.tmp', dir=directory)
                    try:
                        with os.fdopen(fd, 'wb') as fh:
                            np.save(fh, data)
                        os.replace(tmp, path)          # atomic: readers never see half a pool
                    except BaseException:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                        raise
                    pool = _try_load(path, expected_len)
                    if pool is None:
                        raise RuntimeError(f'could not read back pool {path}')
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    with _pool_lock:
        _pool_memo[key] = pool
    return pool


def _try_load(path: Path, expected_len: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode='r')
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (expected_len, 28, 28):
        return None
    return arr


# ------------------------------------------------------------------------------ the stream

class DriftStream:
    """A deterministic sequence of (image, label, corruption, severity) frames.

    Stored as index arrays; images are gathered from cached corrupted pools on demand.
    """

    def __init__(self, name: str, image_indices: np.ndarray, corruption_ids: np.ndarray,
                 severities: np.ndarray, corruptions: Sequence[str], split: str = 'test',
                 seed: int = 0, cache_dir: str | os.PathLike | None = None):
        n = len(image_indices)
        if len(corruption_ids) != n or len(severities) != n:
            raise ValueError('image_indices, corruption_ids, severities must have the same length')
        self.name = name                 # the schedule
        self.seed = seed
        # per-frame arrays (read-only): image index into the split, corruption id, severity
        self.split = split
        self.cache_dir = cache_dir
        self.corruptions: tuple[str, ...] = tuple(corruptions)
        self.image_indices = np.asarray(image_indices, dtype=np.int64)
        self.corruption_ids = np.asarray(corruption_ids, dtype=np.int16)
        self.severities = np.asarray(severities, dtype=np.int8)
        for a in (self.image_indices, self.corruption_ids, self.severities):
            a.flags.writeable = False
        _, all_labels = load_fashion_mnist(split)
        self.labels = all_labels[self.image_indices]

    def __len__(self) -> int:
        return len(self.image_indices)

    def __repr__(self) -> str:
        return (f'DriftStream({self.name!r}, len={len(self)}, split={self.split!r}, '
                f'seed={self.seed}, corruptions={list(self.corruptions)})')

    def _pool(self, cid: int, sev: int) -> np.ndarray:
        return load_pool(self.corruptions[cid], sev, self.split, self.cache_dir)

    def corruption_names(self, idx: np.ndarray | slice) -> list[str]:
        return [self.corruptions[c] for c in self.corruption_ids[idx]]

    def get(self, frames: np.ndarray | Sequence[int]) -> FrameBatch:
        """Frames at the given stream indices (vectorised per (corruption, severity))."""
        idx = np.asarray(frames, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError('frame indices must be 1-D')
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f'frame index out of range 0..{len(self) - 1}')
        cid = self.corruption_ids[idx]
        sev = self.severities[idx]
        img = self.image_indices[idx]
        images = np.empty((len(idx), 28, 28), dtype=np.uint8)
        keys = cid.astype(np.int64) * 16 + sev
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            pool = self._pool(int(key // 16), int(key % 16))
            images[sel] = pool[img[sel]]
        return FrameBatch(index=idx, images=images, labels=self.labels[idx].copy(),
                          corruption=[self.corruptions[c] for c in cid],
                          severity=sev.astype(np.int64))

    def batches(self, batch_size: int = 64, start: int = 0,
                stop: int | None = None) -> Iterator[FrameBatch]:
        """Consecutive batches in stream order (the last one may be smaller)."""
        if batch_size < 1:
            raise ValueError('batch_size must be >= 1')
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(max(0, start), stop, batch_size):
            yield self.get(np.arange(i, min(i + batch_size, stop)))

    def __iter__(self) -> Iterator[FrameBatch]:
        return self.batches(64)

    def frame(self, i: int) -> Frame:
        """One frame (for the sim camera / bag writer)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f'frame {i} out of range 0..{len(self) - 1}')
        cid, sev = int(self.corruption_ids[i]), int(self.severities[i])
        image = np.array(self._pool(cid, sev)[self.image_indices[i]])
        return Frame(index=i, image=image, label=int(self.labels[i]),
                     corruption=self.corruptions[cid], severity=sev)

    def camera_frame(self, i: int, width: int = 640, height: int = 480) -> np.ndarray:
        """Frame i as an rgb8 camera image (HxWx3); model.preprocess_frame inverts it."""
        return render_camera_frame(self.frame(i).image, width, height)

    def schedule(self) -> list[Segment]:
        """Maximal runs of constant (corruption, severity), for plots and reports."""
        n = len(self)
        if n == 0:
            return []
        key = self.corruption_ids.astype(np.int64) * 16 + self.severities
        starts = np.concatenate([[0], np.nonzero(np.diff(key))[0] + 1])
        ends = np.concatenate([starts[1:], [n]])
        return [Segment(int(s), int(e), self.corruptions[int(self.corruption_ids[s])],
                        int(self.severities[s])) for s, e in zip(starts, ends)]

    def prepare(self) -> None:
        """Generate/load every pool the stream uses now (so the first batch is not slow)."""
        pairs = np.unique(self.corruption_ids.astype(np.int64) * 16 + self.severities)
        for key in pairs:
            self._pool(int(key // 16), int(key % 16))


def render_camera_frame(image: np.ndarray, width: int = 640, height: int = 480) -> np.ndarray:
    """A grey item (e.g. 28x28) scaled (nearest) onto the centre square of an rgb8 HxWx3 frame.

    The centre square of side min(width, height) holds the item, the sides are black; pixel i
    of the square shows item pixel floor(i * 28 / side), which is exactly the cell grid that
    model.preprocess_frame samples, so the round trip recovers the item.
    """
    img = np.asarray(image, dtype=np.uint8)
    if img.ndim != 2:
        raise ValueError(f'expected a 2-D grey item, got shape {img.shape}')
    side = min(width, height)
    if side < max(img.shape):
        raise ValueError(f'frame {width}x{height} is smaller than the item {img.shape}')
    rows = np.arange(side) * img.shape[0] // side
    cols = np.arange(side) * img.shape[1] // side
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    # gather columns on the small item first, then whole rows: contiguous copies (~0.4 ms)
    wide = np.repeat(img[..., None], 3, axis=-1).take(cols, axis=1)
    frame[top:top + side, left:left + side] = wide.take(rows, axis=0)
    return frame


# ------------------------------------------------------------------------------ schedules

def _image_sampler(rng: np.random.Generator, n_images: int):
    """Draw image indices without replacement, reshuffling when the split is exhausted."""
    state = {'perm': rng.permutation(n_images), 'pos': 0}

    def take(k: int) -> np.ndarray:
        out = []
        while k > 0:
            if state['pos'] >= n_images:
                state['perm'] = rng.permutation(n_images)
                state['pos'] = 0
            m = min(k, n_images - state['pos'])
            out.append(state['perm'][state['pos']:state['pos'] + m])
            state['pos'] += m
            k -= m
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    return take


def _block_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, length, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _class_runs(rng: np.random.Generator, labels: np.ndarray, k: int,
                run_length: float, n_classes: int = 10) -> np.ndarray:
    """k image indices arranged in runs of one class (geometric run lengths, mean run_length);
    each class is walked through its own permutation, so images repeat only after a full cycle."""
    by_class = [np.nonzero(labels == c)[0] for c in range(n_classes)]
    pos = [int(rng.integers(len(b))) for b in by_class]
    perms = [rng.permutation(b) for b in by_class]
    out = np.empty(k, dtype=np.int64)
    filled, prev = 0, -1
    while filled < k:
        if prev < 0:
            cls = int(rng.integers(n_classes))
        else:                                   # a different class than the previous run
            cls = int(rng.integers(n_classes - 1))
            cls += cls >= prev
        prev = cls
        run = min(k - filled, int(rng.geometric(1.0 / run_length)))
        p = perms[cls]
        idx = [(pos[cls] + j) % len(p) for j in range(run)]
        out[filled:filled + run] = p[idx]
        pos[cls] = (pos[cls] + run) % len(p)
        filled += run
    return out


def make_stream(schedule: str, length: int | None = None, seed: int = 0, severity: int = 5,
                corruptions: Sequence[str] | None = None, split: str = 'test',
                cache_dir: str | os.PathLike | None = None, run_length: float = 100.0,
                ) -> DriftStream:
    """Build a DriftStream; see the module docstring for the schedules.

    length: number of frames (default 10k per corruption for continual/gradual/class_correlated,
    10k for mixed, 100k for long). `corruptions` defaults to DEFAULT_CORRUPTIONS; 'none' (clean)
    is allowed as a corruption. Pools are generated lazily (or call stream.prepare()).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}')
    if not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ValueError(f'severity must be an integer in 1..5, not {severity!r}')
    names = tuple(DEFAULT_CORRUPTIONS if corruptions is None else corruptions)
    if not names:
        raise ValueError('need at least one corruption')
    bad = [c for c in names if c != CLEAN and c not in CORRUPTIONS]
    if bad:
        raise ValueError(f'unknown corruptions {bad}; choose from {list(CORRUPTIONS)} or {CLEAN!r}')
    if len(set(names)) != len(names):
        raise ValueError(f'duplicate corruptions in {list(names)}')
    if length is None:
        length = {'long': LONG_DEFAULT_LENGTH, 'mixed': 10_000}.get(schedule, 10_000 * len(names))
    length = int(length)
    if length < 1:
        raise ValueError('length must be >= 1')
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'test' or 'train', not {split!r}")

    _, labels = load_fashion_mnist(split)
    # separate RNG streams per concern, so e.g. the images do not change if the schedule does
    ss = np.random.SeedSequence([int(seed), zlib.crc32(schedule.encode())])
    rng_img, rng_sched = (np.random.default_rng(s) for s in ss.spawn(2))
    take = _image_sampler(rng_img, len(labels))
    sev = int(severity)
    cid = np.zeros(length, dtype=np.int16)
    sevs = np.zeros(length, dtype=np.int8)

    def severity_of(c: int, s: int) -> int:
        return 0 if names[c] == CLEAN else s

    if schedule in ('continual', 'class_correlated'):
        img = np.empty(length, dtype=np.int64)
        for c, (a, b) in enumerate(_block_bounds(length, len(names))):
            cid[a:b] = c
            sevs[a:b] = severity_of(c, sev)
            if schedule == 'continual':
                img[a:b] = take(b - a)
            else:
                img[a:b] = _class_runs(rng_img, labels, b - a, run_length)
    elif schedule == 'gradual':
        ramp = list(range(1, sev + 1)) + list(range(sev - 1, 0, -1))    # 1..5..1
        img = take(length)
        for c, (a, b) in enumerate(_block_bounds(length, len(names))):
            cid[a:b] = c
            for s, (a2, b2) in zip(ramp, _block_bounds(b - a, len(ramp))):
                sevs[a + a2:a + b2] = severity_of(c, s)
    elif schedule == 'mixed':
        img = take(length)
        cid[:] = rng_sched.integers(len(names), size=length)
        sevs[:] = sev
        sevs[np.isin(cid, [i for i, n in enumerate(names) if n == CLEAN])] = 0
    else:  # long: CCC-like segments of 1k-5k frames, new corruption and severity each time
        img = take(length)
        pos, prev = 0, -1
        while pos < length:
            seg = int(rng_sched.integers(1000, 5001))
            choices = [c for c in range(len(names)) if c != prev] or [0]
            c = int(rng_sched.choice(choices))
            s = int(rng_sched.integers(1, sev + 1))
            cid[pos:pos + seg] = c
            sevs[pos:pos + seg] = severity_of(c, s)
            prev = c
            pos += seg
    return DriftStream(schedule, img, cid, sevs, names, split=split, seed=seed,
                       cache_dir=cache_dir)
