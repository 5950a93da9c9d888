"""Drift streams: determinism, the structure of each schedule, frames drawn from corrupted pools.

Pools live in the shared cache ($ASYNC_TTT_CACHE or ~/.cache/async_ttt_ros) so repeated runs are
fast; a cold cache costs about a second per (corruption, severity) pool.
"""
import numpy as np
import pytest

from async_ttt_ros.core.corruptions import DEFAULT_CORRUPTIONS, corrupt
from async_ttt_ros.core.data import load_fashion_mnist
from async_ttt_ros.core.streams import (CLEAN, LONG_DEFAULT_LENGTH, SCHEDULES, FrameBatch,
                                       generate_pool, load_pool, make_stream)

FEW = ('brightness', 'contrast', 'gaussian_noise')


def _arrays(stream):
    return stream.image_indices, stream.corruption_ids, stream.severities


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_same_seed_same_stream_other_seed_differs(schedule):
    a = make_stream(schedule, 3000, seed=0, corruptions=FEW)
    b = make_stream(schedule, 3000, seed=0, corruptions=FEW)
    c = make_stream(schedule, 3000, seed=1, corruptions=FEW)
    assert len(a) == 3000
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
    assert not np.array_equal(a.image_indices, c.image_indices)
    ba = next(a.batches(256, start=1000))
    bb = next(b.batches(256, start=1000))
    assert np.array_equal(ba.images, bb.images) and np.array_equal(ba.labels, bb.labels)


def test_continual_blocks_one_corruption_each():
    s = make_stream('continual', 10_000, seed=0)
    segs = s.schedule()
    assert [g.corruption for g in segs] == list(DEFAULT_CORRUPTIONS)
    assert all(g.severity == 5 for g in segs)
    assert [g.end - g.start for g in segs] == [1000] * 10
    assert segs[0].start == 0 and segs[-1].end == 10_000
    # within a block the images are a sample without replacement from the test split
    assert len(np.unique(s.image_indices[:1000])) == 1000


def test_gradual_severity_ramps_up_and_down_per_corruption():
    s = make_stream('gradual', 9 * 3 * 50, seed=0, corruptions=FEW)
    segs = s.schedule()
    for name in FEW:
        ramp = [g.severity for g in segs if g.corruption == name]
        assert ramp == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert [g.corruption for g in segs[::9]] == list(FEW)


def test_mixed_changes_corruption_per_frame():
    s = make_stream('mixed', 6000, seed=0, corruptions=FEW)
    counts = np.bincount(s.corruption_ids, minlength=3) / len(s)
    assert np.all(np.abs(counts - 1 / 3) < 0.03)
    assert len(s.schedule()) > 3000          # ~2/3 of consecutive frames change corruption
    assert set(s.severities.tolist()) == {5}


def test_class_correlated_is_non_iid():
    s = make_stream('class_correlated', 4000, seed=0, corruptions=FEW[:2])
    iid = make_stream('continual', 4000, seed=0, corruptions=FEW[:2])

    def mean_run(labels):
        return len(labels) / (1 + np.count_nonzero(np.diff(labels)))

    assert mean_run(s.labels) > 30 > 2 > mean_run(iid.labels)
    assert set(np.unique(s.labels)) == set(range(10))
    assert [g.corruption for g in s.schedule()] == list(FEW[:2])


def test_long_stream_is_ccc_like():
    s = make_stream('long', seed=0)
    assert len(s) == LONG_DEFAULT_LENGTH >= 100_000
    segs = s.schedule()
    lengths = [g.end - g.start for g in segs]
    assert all(1000 <= n <= 5000 for n in lengths[:-1])
    assert all(a.corruption != b.corruption for a, b in zip(segs, segs[1:]))
    assert len({g.corruption for g in segs}) == len(DEFAULT_CORRUPTIONS)
    assert {g.severity for g in segs} == {1, 2, 3, 4, 5}
    assert s.image_indices.nbytes + s.corruption_ids.nbytes + s.severities.nbytes < 2_000_000


def test_frames_come_from_the_corrupted_pools():
    x, y = load_fashion_mnist('test')
    s = make_stream('continual', 600, seed=3, corruptions=('brightness', CLEAN, 'contrast'))
    batch = s.get(np.arange(0, 600, 50))
    assert isinstance(batch, FrameBatch) and batch.images.dtype == np.uint8
    for j, i in enumerate(batch.index):
        src = s.image_indices[i]
        name, sev = batch.corruption[j], int(batch.severity[j])
        assert batch.labels[j] == y[src]
        expected = x[src] if name == CLEAN else corrupt(x[src], name, sev)
        assert np.array_equal(batch.images[j], expected)
        f = s.frame(int(i))
        assert np.array_equal(f.image, expected) and f.label == y[src]
        assert (f.corruption, f.severity) == (name, sev)
    assert set(batch.severity[np.array(batch.corruption) == CLEAN].tolist()) == {0}
    total = sum(len(b) for b in s.batches(64))
    assert total == 600
    cam = s.camera_frame(5, 640, 480)
    assert cam.shape == (480, 640, 3) and cam.dtype == np.uint8


def test_pool_cache_is_written_once_and_reused(tmp_path):
    pool = load_pool('brightness', 2, 'test', cache_dir=tmp_path)
    files = list((tmp_path / 'pools').rglob('*.npy'))
    assert len(files) == 1 and not list((tmp_path / 'pools').rglob('*.tmp'))
    assert pool.shape == (10000, 28, 28) and pool.dtype == np.uint8
    assert np.array_equal(pool, generate_pool('brightness', 2, 'test'))
    mtime = files[0].stat().st_mtime_ns
    again = load_pool('brightness', 2, 'test', cache_dir=tmp_path)
    assert again is pool and files[0].stat().st_mtime_ns == mtime


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='schedule'):
        make_stream('sideways', 10)
    with pytest.raises(ValueError, match='severity'):
        make_stream('continual', 10, severity=6)
    with pytest.raises(ValueError, match='unknown corruptions'):
        make_stream('continual', 10, corruptions=['rain'])
    with pytest.raises(ValueError, match='length'):
        make_stream('continual', 0)
    s = make_stream('continual', 10, corruptions=FEW)
    with pytest.raises(IndexError):
        s.frame(10)
