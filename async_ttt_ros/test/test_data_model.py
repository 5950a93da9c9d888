"""Fashion-MNIST loading, the split model, adaptable state and reproducible training (ROS-free)."""
import gzip

import numpy as np
import pytest
import torch

from async_ttt_ros.core import data
from async_ttt_ros.core.data import CLASS_NAMES, DatasetMissingError, load_fashion_mnist
from async_ttt_ros.core.model import (adaptable_state, build_model, default_tap,
                                     load_adaptable_state, preprocess, preprocess_frame, taps)
from async_ttt_ros.core.streams import render_camera_frame
from async_ttt_ros.core.training import (checkpoint_path, evaluate_accuracy, load_or_train,
                                        train_model)

torch.set_num_threads(1)


def test_dataset_loads_real_fashion_mnist():
    x, y = load_fashion_mnist('test')
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10          # the test split is balanced
    xt, yt = load_fashion_mnist('train')
    assert xt.shape == (60000, 28, 28) and set(np.unique(yt)) == set(range(10))
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[9] == 'Ankle boot'
    assert 60 < x.mean() < 90                               # real images, not zeros
    with pytest.raises(ValueError):
        load_fashion_mnist('validation')


def test_missing_dataset_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / 'nowhere'))
    with pytest.raises(DatasetMissingError) as err:
        load_fashion_mnist('test')
    assert 'dataset-fashion-mnist' in str(err.value)
    assert 'apt-get install' in str(err.value)
    # a directory without the files is reported the same way
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(DatasetMissingError, match='dataset-fashion-mnist'):
        load_fashion_mnist('train')


def test_corrupt_idx_file_is_rejected(tmp_path, monkeypatch):
    for name in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
        with gzip.open(tmp_path / name, 'wb') as fh:
            fh.write(b'\x00\x00\x09\x03' + b'\x00' * 20)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match='magic'):
        load_fashion_mnist('test')


@pytest.mark.parametrize('tap', taps('fmnist_cnn'))
def test_split_forward_equals_classify_of_features(tap):
    torch.manual_seed(0)
    model = build_model('fmnist_cnn', tap).eval()
    x = preprocess(load_fashion_mnist('test')[0][:16])
    with torch.no_grad():
        full = model(x)
        split = model.classify(model.features(x))
    assert full.shape == (16, 10)
    assert torch.equal(full, split)
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert any(p.requires_grad for p in model.head.parameters())


def test_default_tap_keeps_every_bn_adaptable_and_latents_small():
    model = build_model()
    assert model.tap == default_tap('fmnist_cnn') == 'conv1'
    assert int(np.prod(model.latent_shape)) <= 16384
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.stem.modules())
    n_bn = sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.modules())
    assert len(adaptable_state(model)) == 4 * n_bn


def test_stem_stays_frozen_and_in_eval_mode():
    torch.manual_seed(0)
    model = build_model('fmnist_cnn', 'block1')
    model.train()
    assert not model.stem.training and model.head.training
    before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    x = preprocess(load_fashion_mnist('test')[0][:32])
    model(x).sum().backward()                          # BN in train mode + gradients
    assert all(torch.equal(before[k], v) for k, v in model.stem.state_dict().items())
    assert all(p.grad is None for p in model.stem.parameters())


def test_adaptable_state_round_trip_and_validation():
    torch.manual_seed(0)
    model = build_model()
    state = adaptable_state(model)
    head_keys = set(model.head.state_dict())
    assert set(state) <= head_keys
    assert not any(k.endswith('num_batches_tracked') for k in state)
    assert {k.rsplit('.', 1)[1] for k in state} == {'weight', 'bias', 'running_mean', 'running_var'}
    # detached clones: changing the model does not change the snapshot
    with torch.no_grad():
        model.head.bn1.weight.mul_(3.0)
        model.head.bn1.running_mean.add_(1.0)
    assert not torch.equal(state['bn1.weight'], model.head.bn1.weight)
    load_adaptable_state(model, state)
    assert all(torch.equal(v, adaptable_state(model)[k]) for k, v in state.items())
    # bad input is refused before anything changes
    snapshot = adaptable_state(model)
    bad = dict(state)
    bad['bn2.weight'] = torch.ones(3)
    bad['bn1.bias'] = state['bn1.bias'] + 5
    with pytest.raises(ValueError, match='shape'):
        load_adaptable_state(model, bad)
    assert all(torch.equal(v, adaptable_state(model)[k]) for k, v in snapshot.items())
    with pytest.raises(ValueError, match='missing'):
        load_adaptable_state(model, {k: v for k, v in state.items() if k != 'bn1.weight'})
    nan = dict(state)
    nan['bn1.weight'] = torch.full_like(state['bn1.weight'], float('nan'))
    with pytest.raises(ValueError, match='non-finite'):
        load_adaptable_state(model, nan)


def test_preprocess_accepts_grey_colour_and_camera_frames():
    imgs = load_fashion_mnist('test')[0][:4]
    grey = preprocess(imgs)
    assert grey.shape == (4, 1, 28, 28) and grey.dtype == torch.float32
    assert abs(float(preprocess(load_fashion_mnist('test')[0][:2000]).mean())) < 0.2
    rgb = np.repeat(imgs[..., None], 3, axis=-1)
    assert torch.allclose(preprocess(rgb), grey, atol=1e-5)
    # a 640x480 rgb8 camera frame with the item in its centre square maps back to the item
    frame = render_camera_frame(imgs[0], 640, 480)
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    back = preprocess_frame(frame)
    assert back.shape == (1, 1, 28, 28)
    assert torch.allclose(back, grey[:1], atol=1e-5)          # exact round trip
    assert torch.allclose(preprocess_frame(frame[..., 0]), grey[:1], atol=1e-5)   # mono8
    assert preprocess_frame(frame, 'camera_resnet18').shape == (1, 3, 224, 224)
    with pytest.raises(ValueError):
        preprocess_frame(frame.astype(np.float32))
    with pytest.raises(ValueError):
        preprocess(imgs.astype(np.float32))
    cam = preprocess(imgs, 'camera_resnet18')
    assert cam.shape == (4, 3, 224, 224)


def test_training_is_deterministic_per_seed():
    x, y = load_fashion_mnist('train')
    x, y = x[:512], y[:512]
    a = train_model(x, y, epochs=1, seed=3).full_state_dict()
    b = train_model(x, y, epochs=1, seed=3).full_state_dict()
    c = train_model(x, y, epochs=1, seed=4).full_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_checkpoint_key_depends_on_config(tmp_path):
    base = checkpoint_path('fmnist_cnn', 2, 0, tmp_path)
    assert base.parent == tmp_path / 'models'
    assert checkpoint_path('fmnist_cnn', 3, 0, tmp_path) != base
    assert checkpoint_path('fmnist_cnn', 2, 1, tmp_path) != base
    assert checkpoint_path('fmnist_cnn', 2, 0, tmp_path) == base


def test_cached_source_model_reaches_clean_accuracy():
    """Uses (or trains once) the cached default model; re-measures accuracy on real test data."""
    model = load_or_train(log=None)
    assert not model.training and not model.stem.training
    assert model.meta['clean_accuracy'] >= 0.88
    x, y = load_fashion_mnist('test')
    assert evaluate_accuracy(model, x[:2000], y[:2000]) >= 0.86
    other = load_or_train(tap='block1', log=None)          # same weights, other split point
    xb = preprocess(x[:64])
    with torch.no_grad():
        assert torch.allclose(model(xb), other(xb), atol=1e-5)


def test_camera_model_is_marked_untrained():
    model = load_or_train('camera_resnet18', log=None)
    assert model.info()['pretrained'] is False and model.meta['clean_accuracy'] is None
    assert model.input_shape == (3, 224, 224)
    with torch.no_grad():
        z = model.features(torch.zeros(1, 3, 224, 224))
        assert model.classify(z).shape == (1, 10)
    assert tuple(z.shape[1:]) == model.latent_shape
