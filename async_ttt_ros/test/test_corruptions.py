"""Corruptions against the imagecorruptions 1.1.2 reference fixture, and their basic properties.

The fixture (test/data/corruption_reference.npz) is produced by
scripts/make_corruption_reference.py with the real reference package in an isolated venv.
"""
from pathlib import Path

import numpy as np
import pytest

from async_ttt_ros.core.corruptions import (CORRUPTIONS, DEFAULT_CORRUPTIONS, RANDOM_CORRUPTIONS,
                                           corrupt, corrupt_images, luma)
from async_ttt_ros.core.data import load_fashion_mnist

FIXTURE = Path(__file__).parent / 'data' / 'corruption_reference.npz'
DETERMINISTIC = [c for c in CORRUPTIONS if c not in RANDOM_CORRUPTIONS]


@pytest.fixture(scope='module')
def ref():
    data = np.load(FIXTURE)
    return {k: data[k] for k in data.files}


def test_fixture_is_real_fashion_mnist(ref):
    x, _ = load_fashion_mnist('test')
    assert np.array_equal(ref['clean'], x[ref['indices']])


@pytest.mark.parametrize('name', DETERMINISTIC)
def test_deterministic_corruptions_match_reference(ref, name):
    for sev in range(1, 6):
        expected = ref[f'{name}/{sev}'].astype(int)
        got = corrupt(ref['clean'], name, sev).astype(int)
        assert got.shape == expected.shape
        diff = np.abs(got - expected)
        assert diff.max() <= 2, f'{name} severity {sev}: max diff {diff.max()}'
        assert diff.mean() <= 0.05


@pytest.mark.parametrize('name', sorted(RANDOM_CORRUPTIONS))
def test_random_corruptions_match_reference_statistics(ref, name):
    clean = ref['clean'].astype(int)
    reps = 6
    tol = 0.25 if name == 'fog' else 0.12     # fog: one smooth random field per image
    for sev in range(1, 6):
        expected = ref[f'{name}/{sev}'].astype(int)
        ours = np.concatenate([corrupt(ref['clean'], name, sev, np.random.default_rng(r))
                               for r in range(reps)]).astype(int)
        ref_damage = np.abs(expected - clean).mean()
        our_damage = np.abs(ours - np.tile(clean, (reps, 1, 1))).mean()
        assert abs(our_damage - ref_damage) <= tol * ref_damage + 1.0, (name, sev)
        ref_mean, our_mean = expected.mean(), ours.mean()
        assert abs(our_mean - ref_mean) <= tol * max(ref_mean, 10) + 2.0, (name, sev)


def _damage(clean, corrupted):
    a = clean.reshape(len(clean), -1).astype(float)
    b = corrupted.reshape(len(corrupted), -1).astype(float)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    corr = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-9)
    return np.abs(corrupted.astype(int) - clean.astype(int)).mean(), corr.mean()


@pytest.mark.parametrize('name', DEFAULT_CORRUPTIONS)
def test_severity_is_monotone_in_damage(name):
    x = load_fashion_mnist('test')[0][:300]
    abs_err, corr = zip(*(_damage(x, corrupt(x, name, s, np.random.default_rng(0)))
                          for s in range(1, 6)))
    assert all(b > a for a, b in zip(abs_err, abs_err[1:])), abs_err
    assert all(b <= a + 2e-3 for a, b in zip(corr, corr[1:])), corr
    assert abs_err[0] > 0


@pytest.mark.parametrize('name', sorted(RANDOM_CORRUPTIONS))
def test_randomness_comes_from_the_explicit_generator(name):
    x = load_fashion_mnist('test')[0][:8]
    a = corrupt(x, name, 3, np.random.default_rng(7))
    b = corrupt(x, name, 3, np.random.default_rng(7))
    c = corrupt(x, name, 3, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match='Generator'):
        corrupt(x, name, 3)


def test_shapes_and_bad_input():
    x = load_fashion_mnist('test')[0][:3]
    single = corrupt(x[0], 'contrast', 2)
    assert single.shape == (28, 28) and single.dtype == np.uint8
    assert np.array_equal(single, corrupt(x, 'contrast', 2)[0])
    assert corrupt(x[:0], 'contrast', 2).shape == (0, 28, 28)
    for bad in (0, 6, 2.5):
        with pytest.raises(ValueError, match='severity'):
            corrupt(x, 'contrast', bad)
    with pytest.raises(ValueError, match='unknown corruption'):
        corrupt(x, 'snow', 1)
    with pytest.raises(ValueError, match='uint8'):
        corrupt(x.astype(np.float32), 'contrast', 1)
    with pytest.raises(ValueError, match='32x32'):
        corrupt_images(x, 'contrast', 1)


def test_full_size_api_agrees_with_grey_protocol():
    """corrupt() == pad -> corrupt_images(RGB) -> grey -> crop, for a deterministic corruption."""
    x = load_fashion_mnist('test')[0][:4]
    rgb = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
    for name in ('defocus_blur', 'jpeg_compression', 'pixelate'):
        full = corrupt_images(rgb, name, 4)
        assert full.shape == rgb.shape
        assert np.array_equal(luma(full)[:, 2:30, 2:30], corrupt(x, name, 4))
    # colour images go through the HSV path of brightness
    colour = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    bright = corrupt_images(colour, 'brightness', 3)
    assert bright.shape == colour.shape and bright.mean() > colour.mean()
