"""ParameterDelta wire form + signatures, and ServedModel's all-or-nothing apply.

Uses the real fmnist_cnn architecture (seeded init: what is tested here does not depend on the
weights being trained).
"""
import time

import numpy as np
import pytest
import torch

from async_ttt_ros.core.delta import (DeltaFormatError, ParameterDelta, compute_delta, flatten,
                                      sign, unflatten, verify)
from async_ttt_ros.core.model import adaptable_state, build_model
from async_ttt_ros.core.serving import ServedModel

torch.set_num_threads(1)
KEY = b'test-key-0123456789'


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model('fmnist_cnn')
    # non-trivial running stats so that deltas against them mean something
    with torch.no_grad():
        m.train()
        m(torch.randn(64, 1, 28, 28))
    return m.eval()


def _state_bytes(model):
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def _small_delta(served, scale=0.01, seed=0, delta_id=None, key=None):
    rng = np.random.default_rng(seed)
    version, state = served.state()
    tensors = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32)
               for k, v in state.items() if not k.endswith('running_var')}
    tensors['bn1.running_var'] = np.full(state['bn1.running_var'].shape, 0.01, np.float32)
    d = ParameterDelta(delta_id or f'd{seed}-{version}', version, tensors)
    if key:
        d.signature = sign(d, key)
    return d


# ------------------------------------------------------------------------------------------------
# delta

def test_compute_delta_is_additive_float32_and_skips_integer_entries(model):
    base = adaptable_state(model)
    new = {k: v + 1.5 for k, v in base.items()}
    base_with_counter = {**base, 'bn1.num_batches_tracked': torch.tensor(3)}
    new_with_counter = {**new, 'bn1.num_batches_tracked': torch.tensor(7)}
    d = compute_delta(new_with_counter, base_with_counter, base_version=4, delta_id='x')
    assert d.base_version == 4 and d.delta_id == 'x'
    assert 'bn1.num_batches_tracked' not in d.tensors
    assert set(d.tensors) == set(base)
    for k, v in d.tensors.items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, 1.5, rtol=0, atol=1e-6)
    assert compute_delta(new, base, 0).delta_id != compute_delta(new, base, 0).delta_id   # fresh ids


def test_flatten_unflatten_roundtrip_and_precise_errors(model):
    base = adaptable_state(model)
    d = compute_delta({k: v * 2 for k, v in base.items()}, base, 0)
    d.tensors['scalar'] = np.array(3.0, np.float32)            # rank 0 survives too
    names, ranks, dims, values = flatten(d)
    assert values.dtype == np.float32 and len(names) == len(ranks) == len(d.tensors)
    back = unflatten(names, ranks, dims, values)
    assert list(back) == names
    for k in names:
        assert back[k].shape == d.tensors[k].shape
        assert back[k].tobytes() == d.tensors[k].tobytes()

    with pytest.raises(DeltaFormatError, match='names but .* ranks'):
        unflatten(names, ranks[:-1], dims, values)
    with pytest.raises(DeltaFormatError, match='ranks sum to .* dims'):
        unflatten(names, ranks, dims[:-1], values)
    with pytest.raises(DeltaFormatError, match='values in total but'):
        unflatten(names, ranks, dims, values[:-1])
    with pytest.raises(DeltaFormatError, match='duplicate names'):
        unflatten([names[0], names[0]], [1, 1], [2, 2], np.zeros(4, np.float32))
    with pytest.raises(DeltaFormatError, match='negative'):
        unflatten(['a'], [1], [-1], np.zeros(0, np.float32))


def test_signature_covers_id_version_names_shapes_values(model):
    base = adaptable_state(model)
    d = compute_delta({k: v + 0.1 for k, v in base.items()}, base, 3, delta_id='abc')
    d.signature = sign(d, KEY)
    assert verify(d, KEY)
    assert not verify(d, b'other-key')
    # reordering the dict does not change the canonical payload
    reordered = ParameterDelta('abc', 3, dict(reversed(list(d.tensors.items()))), signature=d.signature)
    assert verify(reordered, KEY)
    tampered = [
        ParameterDelta('abd', 3, d.tensors, signature=d.signature),
        ParameterDelta('abc', 4, d.tensors, signature=d.signature),
        ParameterDelta('abc', 3, {**d.tensors, 'bn1.bias': d.tensors['bn1.bias'] * 2}, signature=d.signature),
        ParameterDelta('abc', 3, {**d.tensors, 'bn1.bias': d.tensors['bn1.bias'].reshape(2, -1)},
                       signature=d.signature),
        ParameterDelta('abc', 3, {k: v for k, v in d.tensors.items() if k != 'bn4.bias'},
                       signature=d.signature),
    ]
    for t in tampered:
        assert not verify(t, KEY)


# ------------------------------------------------------------------------------------------------
# serving

def test_apply_accepts_and_versions_increase_by_one(model):
    served = ServedModel(model, hmac_key=KEY)
    before = adaptable_state(model)
    x = torch.randn(8, 1, 28, 28)
    times, swaps = [], []
    for i in range(5):
        d = _small_delta(served, seed=i, key=KEY)
        t0 = time.perf_counter()
        r = served.apply(d)
        times.append(time.perf_counter() - t0)
        swaps.append(served.last_swap_s)
        assert r.accepted, r.reason
        assert r.version == i + 1 == served.version
    after = adaptable_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logits, latents = served.predict(x)
    assert logits.shape == (8, 10) and latents.shape[0] == 8
    assert served.predict_versioned(x)[2] == 5
    print(f'\nServedModel.apply (fmnist_cnn head BN, {sum(v.numel() for v in before.values())} values): '
          f'median {np.median(times) * 1e3:.3f} ms, max {max(times) * 1e3:.3f} ms; swap under lock '
          f'median {np.median(swaps) * 1e3:.3f} ms')


def test_every_refusal_leaves_weights_byte_identical(model):
    served = ServedModel(model, max_delta_norm=20.0, hmac_key=KEY)
    assert served.apply(_small_delta(served, seed=1, delta_id='first', key=KEY)).accepted
    version = served.version
    good = _small_delta(served, seed=2, key=KEY)

    def variant(**changes):
        tensors = dict(good.tensors)
        tensors.update(changes.pop('tensors', {}))
        for k in changes.pop('drop', []):
            tensors.pop(k)
        d = ParameterDelta(changes.pop('delta_id', good.delta_id), changes.pop('base_version', version), tensors)
        if changes.pop('signed', True):
            d.signature = sign(d, KEY)
        assert not changes
        return d

    nan = good.tensors['bn2.weight'].copy()
    nan[3] = np.nan
    inf = good.tensors['bn3.bias'].copy()
    inf[0] = np.inf
    cases = {
        'unknown parameter names': variant(tensors={'fc2.weight': np.zeros((10, 128), np.float32)}),
        'does not match': variant(tensors={'bn1.weight': np.zeros(17, np.float32)}),
        'non-finite': variant(tensors={'bn2.weight': nan}),
        'non-finite ': variant(tensors={'bn3.bias': inf}),
        'exceeds the bound': variant(tensors={'bn4.weight': np.full(128, 10.0, np.float32)}),
        'stale base_version': variant(base_version=version - 1),
        'future base_version': variant(base_version=version + 1),
        'replayed delta_id': variant(delta_id='first'),
        'bad signature': ParameterDelta(good.delta_id, version, good.tensors, signature=b'\0' * 32),
        'missing signature': variant(signed=False),
        'running variance <= 0': variant(tensors={'bn1.running_var': -served.state()[1]['bn1.running_var'] - 0.1}),
    }
    before = _state_bytes(model)
    for expected, delta in cases.items():
        r = served.apply(delta)
        assert not r.accepted, expected
        assert expected.strip() in r.reason, (expected, r.reason)
        assert r.version == version == served.version
        assert _state_bytes(model) == before, f'weights changed after refusal: {expected}'
    # wrong key at the server: the same good delta is refused, then accepted with the right key
    assert served.apply(good).accepted
    assert served.version == version + 1


def test_allowed_names_restrict_what_a_delta_may_touch(model):
    served = ServedModel(model, allowed_names=['bn4.weight', 'bn4.bias'])
    d = ParameterDelta('a', 0, {'bn1.weight': np.zeros(16, np.float32)})
    r = served.apply(d)
    assert not r.accepted and 'not allowed' in r.reason
    assert served.apply(ParameterDelta('b', 0, {'bn4.bias': np.ones(128, np.float32)})).accepted


def test_rollback_reset_and_checkpoint_roundtrip(model, tmp_path):
    served = ServedModel(model, history=4)
    source = _state_bytes(model)
    states = {0: source}
    for i in range(6):
        assert served.apply(_small_delta(served, seed=i)).accepted
        states[served.version] = _state_bytes(model)
    assert served.history_versions() == [3, 4, 5, 6]
    r = served.rollback(1)
    assert not r.accepted and 'not in the history' in r.reason and served.version == 6
    r = served.rollback(4)
    assert r.accepted and r.version == 7 and _state_bytes(model) == states[4]
    r = served.reset_to_source()
    assert r.accepted and r.version == 8 and _state_bytes(model) == source

    assert served.apply(_small_delta(served, seed=9, delta_id='before-save')).accepted
    saved = _state_bytes(model)
    path = served.save_checkpoint(tmp_path / 'served.pt')
    assert path.exists() and not list(tmp_path.glob('*.tmp'))

    fresh_model = build_model('fmnist_cnn')
    fresh_model.load_full_state_dict(model.full_state_dict())
    other = ServedModel(fresh_model)
    other.reset_to_source()
    r = other.load_checkpoint(path)
    assert r.accepted and other.version == 9
    assert _state_bytes(fresh_model) == saved
    # replay protection survives the restart
    replay = _small_delta(other, seed=9, delta_id='before-save')
    assert 'replayed' in other.apply(replay).reason
    # garbage file: refused, nothing changes
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    r = other.load_checkpoint(tmp_path / 'bad.pt')
    assert not r.accepted and _state_bytes(fresh_model) == saved and other.version == 9


def test_from_wire_roundtrip_applies(model):
    served = ServedModel(model, hmac_key=KEY)
    d = _small_delta(served, seed=3, key=KEY)
    names, ranks, dims, values = flatten(d)
    wire = ParameterDelta.from_wire(d.delta_id, d.base_version, names, ranks, dims, values.tolist(),
                                    signature=d.signature)
    assert verify(wire, KEY)
    assert served.apply(wire).accepted
