"""Adaptation methods on latents: the real trained source model on a real corrupted stream.

Protocol: online, predict-then-adapt, batches of 64 latents of a 2048-frame severity-5
gaussian_noise Fashion-MNIST stream. The prediction uses the model as it would be served (eval
mode: BN running statistics), then the method takes one step on the same batch.
"""
import copy

import pytest
import torch

from async_ttt_ros.core.methods import METHODS, make_method
from async_ttt_ros.core.model import adaptable_state, preprocess
from async_ttt_ros.core.streams import make_stream
from async_ttt_ros.core.training import load_or_train

torch.set_num_threads(1)

STREAM_LENGTH = 2048
BATCH = 64
RESULTS: dict[str, float] = {}


@pytest.fixture(scope='module')
def source():
    return load_or_train('fmnist_cnn')


@pytest.fixture(scope='module')
def noise_batches(source):
    """[(latents, labels)] of the gaussian_noise stream, computed once by the frozen stem."""
    stream = make_stream('continual', STREAM_LENGTH, seed=0, severity=5, corruptions=['gaussian_noise'])
    out = []
    with torch.no_grad():
        for batch in stream.batches(BATCH):
            assert set(batch.corruption) == {'gaussian_noise'}
            out.append((source.features(preprocess(batch.images)), torch.as_tensor(batch.labels)))
    return out


def online_accuracy(source, batches, name, **hp):
    model = copy.deepcopy(source)
    method = make_method(name, model, **hp)
    correct = total = 0
    for z, y in batches:
        with torch.no_grad():
            model.eval()
            pred = model.classify(z).argmax(1)
        correct += int((pred == y).sum())
        total += int(y.numel())
        method.step(z)
    return correct / total, method


def test_registry_and_unknown_names(source):
    assert set(METHODS) == {'source', 'norm', 'tent', 'eata', 'safe'}
    with pytest.raises(ValueError, match='unknown adaptation method'):
        make_method('nope', copy.deepcopy(source))
    with pytest.raises(TypeError, match='unknown hyper-parameters'):
        make_method('norm', copy.deepcopy(source), learning_rate=1.0)


@pytest.mark.parametrize('name', ['norm', 'tent', 'eata', 'safe'])
def test_method_beats_source_by_20_points(source, noise_batches, name):
    if 'source' not in RESULTS:
        RESULTS['source'], _ = online_accuracy(source, noise_batches, 'source')
    acc, method = online_accuracy(source, noise_batches, name)
    RESULTS[name] = acc
    print(f"\n{name}: online accuracy {acc:.3f} vs source {RESULTS['source']:.3f} "
          f"({len(noise_batches)} batches of {BATCH}, gaussian_noise s5)")
    assert method.steps == len(noise_batches) - (1 if noise_batches[-1][0].shape[0] < 2 else 0)
    assert acc >= RESULTS['source'] + 0.20


def test_only_adaptable_state_changes_and_reset_restores_source(source, noise_batches):
    model = copy.deepcopy(source)
    full_before = {k: v.clone() for k, v in model.state_dict().items()}
    method = make_method('tent', model)
    for z, _ in noise_batches[:3]:
        method.step(z)
    adaptable = set(adaptable_state(model)) | {k for k in model.head.state_dict() if k.endswith('num_batches_tracked')}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, full_before[k])}
    head_changed = {k.split('.', 1)[1] for k in changed if k.startswith('head.')}
    assert changed and head_changed <= adaptable
    assert not any(k.startswith('stem.') for k in changed)      # the stem never learns
    assert any(k.endswith('.weight') and k.startswith('bn') for k in head_changed)   # affine moved
    assert any(k.endswith('running_mean') for k in head_changed)                    # stats moved
    method.reset()
    after = adaptable_state(model)
    for k, v in adaptable_state(source).items():
        assert torch.equal(after[k], v), k
    assert method.resets == 1


def test_norm_changes_statistics_only(source, noise_batches):
    model = copy.deepcopy(source)
    method = make_method('norm', model)
    method.step(noise_batches[0][0])
    before, after = adaptable_state(source), adaptable_state(model)
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != (k.endswith('running_mean') or k.endswith('running_var')), k


def test_eata_filters_unreliable_and_redundant_samples(source, noise_batches):
    _, method = online_accuracy(source, noise_batches[:6], 'eata')
    info = method.step(noise_batches[6][0])
    assert 0 <= info['n_selected'] <= info['n_reliable'] <= BATCH
    assert info['n_selected'] < BATCH                # something was filtered
    assert method.fisher is not None and any(float(f.sum()) > 0 for f in method.fisher)


def test_safe_periodic_reset(source, noise_batches):
    model = copy.deepcopy(source)
    method = make_method('safe', model, reset_every=3)
    infos = [method.step(z) for z, _ in noise_batches[:7]]
    assert [i['reset'] for i in infos] == [False, False, True, False, False, True, False]
    assert 'periodic' in infos[2]['reset_reason']
