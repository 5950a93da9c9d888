"""Property-based tests (hypothesis) over the two untrusted inputs of perception: image messages
and delta requests.

Properties:
- image_to_numpy either returns a view of exactly the declared shape that can be read end to end,
  or raises ImageFormatError; nothing else escapes.
- perception_node's image callback (a real PerceptionNode in this process, called directly with
  real sensor_msgs/Image objects) never raises; every frame is either classified or counted as
  malformed with a reason, never both, never neither.
- request_to_delta + ServedModel.apply, and perception_node's service callback: a refused delta
  leaves the served weights byte-identical and the version unchanged; an accepted one changes
  exactly the named tensors by exactly the delta and bumps the version by one.
"""
from __future__ import annotations

import array

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from async_ttt_ros.imaging import ENCODINGS, MAX_DIM, ImageFormatError, image_to_numpy

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])
MAX_BYTES = 1 << 20          # keep generated images small: the machine is shared

ENCODING_NAMES = sorted(ENCODINGS) + ['yuv422', '', 'RGB8', 'rgb16', 'bayer_rggb8', '8UC4',
                                      '16SC3', 'rgb8\x00', 'mono8 ']
DIMS = st.one_of(st.integers(40, 48), st.integers(0, 48), st.sampled_from([0, 1, 2, 480, 640, MAX_DIM, MAX_DIM + 1,
                                                      2**31, 2**32 - 1]))


@st.composite
def image_fields(draw):
    """Fields of a sensor_msgs/Image: mostly nearly consistent, with one or more defects."""
    encoding = draw(st.one_of(st.sampled_from(sorted(ENCODINGS)),
                              st.sampled_from(ENCODING_NAMES)))
    spec = ENCODINGS.get(encoding)
    bpp = spec.dtype.itemsize * spec.channels if spec else draw(st.integers(1, 8))
    height, width = draw(DIMS), draw(DIMS)
    row = width * bpp
    step = draw(st.one_of(st.just(row), st.just(row), st.just(row + draw(st.integers(1, 16))),
                          st.just(max(row - 1, 0)), st.integers(0, 2**32 - 1)))
    step = min(step, 2**32 - 1)
    exact = step * height
    if exact <= MAX_BYTES and draw(st.integers(0, 3)):
        size = exact + draw(st.sampled_from([0, 0, 0, -1, 1, -step if step else 0]))
    else:
        size = draw(st.integers(0, 4096))
    size = max(size, 0)
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    big = draw(st.one_of(st.sampled_from([0, 1]), st.sampled_from([0, 1]), st.integers(0, 255)))
    return dict(encoding=encoding, height=height, width=width, step=step, data=data,
                is_bigendian=big)


@st.composite
def valid_image_fields(draw):
    """Consistent frames of every supported encoding (row padding, either byte order)."""
    encoding = draw(st.sampled_from(sorted(ENCODINGS)))
    spec = ENCODINGS[encoding]
    height, width = draw(st.integers(40, 64)), draw(st.integers(40, 64))
    step = width * spec.dtype.itemsize * spec.channels + spec.dtype.itemsize * draw(st.integers(0, 4))
    size = step * height
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    return dict(encoding=encoding, height=height, width=width, step=step, data=data,
                is_bigendian=draw(st.sampled_from([0, 1])))


def make_image(fields):
    from sensor_msgs.msg import Image
    msg = Image(height=fields['height'], width=fields['width'], encoding=fields['encoding'],
                step=fields['step'], is_bigendian=fields['is_bigendian'])
    msg.data = array.array('B', fields['data'])
    return msg


@settings(max_examples=300, **SETTINGS)
@given(image_fields())
def test_image_to_numpy_returns_a_readable_view_or_a_format_error(fields):
    msg = make_image(fields)
    try:
        pixels = image_to_numpy(msg)
    except ImageFormatError:
        return
    spec = ENCODINGS[fields['encoding']]
    expected = (fields['height'], fields['width']) + ((spec.channels,) if spec.channels > 1 else ())
    assert pixels.shape == expected
    assert pixels.dtype.itemsize == spec.dtype.itemsize
    # every element lies inside the buffer: reading all of them must not fault or raise
    assert np.array(pixels).nbytes == pixels.size * pixels.dtype.itemsize


# ---------------------------------------------------------------------------------------------
# the perception node, in this process

@pytest.fixture(scope='module')
def perception():
    import torch
    torch.set_num_threads(1)
    from rclpy.parameter import Parameter

    from async_ttt_ros.core.training import load_or_train
    from async_ttt_ros.nodes.perception_node import PerceptionNode
    from ros_harness import free_domain_id, rclpy_in_domain
    load_or_train('fmnist_cnn')
    with rclpy_in_domain(free_domain_id()) as context:
        node = PerceptionNode(context=context, parameter_overrides=[
            Parameter('roi', value=[8, 8, 32, 32]), Parameter('latents_every_n', value=0)])
        try:
            yield node
        finally:
            node.destroy_node()


@settings(max_examples=200, **SETTINGS)
@given(st.one_of(image_fields(), valid_image_fields()))
def test_perception_image_callback_classifies_or_counts_every_frame(perception, fields):
    node = perception
    frames, malformed = node.frames.total, node.malformed
    reasons = dict(node.malformed_by_reason)
    version, before = node.served.state()
    node._on_image(make_image(fields))               # must not raise, whatever the fields
    classified = node.frames.total - frames
    dropped = node.malformed - malformed
    assert classified + dropped == 1, (classified, dropped)
    changed = {k: node.malformed_by_reason[k] - reasons[k] for k in reasons}
    assert sum(changed.values()) == dropped
    event('classified' if classified else 'dropped: ' + max(changed, key=changed.get))
    if dropped:
        assert changed['other'] == 0, 'a refused frame must have a named reason'
    after_version, after = node.served.state()
    assert after_version == version and all(np.array_equal(after[k], before[k]) for k in before)


def test_a_valid_frame_is_classified(perception):
    """The property above is not vacuous: consistent frames do reach the model."""
    rgb = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    frames = perception.frames.total
    perception._on_image(make_image(dict(encoding='rgb8', height=48, width=48, step=144,
                                         data=rgb.tobytes(), is_bigendian=0)))
    assert perception.frames.total == frames + 1


# ---------------------------------------------------------------------------------------------
# delta requests

@pytest.fixture(scope='module')
def served_model():
    import copy

    import torch
    torch.set_num_threads(1)
    from async_ttt_ros.core.serving import ServedModel
    from async_ttt_ros.core.training import load_or_train
    return ServedModel(copy.deepcopy(load_or_train('fmnist_cnn')), max_delta_norm=50.0)


SHAPES = None


def _shapes():
    global SHAPES
    if SHAPES is None:
        import torch
        torch.set_num_threads(1)
        from async_ttt_ros.core.model import adaptable_state
        from async_ttt_ros.core.training import load_or_train
        SHAPES = {k: tuple(v.shape) for k, v in adaptable_state(load_or_train('fmnist_cnn')).items()}
    return SHAPES


VALUE = st.one_of(st.floats(-0.5, 0.5, width=32),
                  st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38]))


@st.composite
def delta_requests(draw, base_choices):
    """ApplyParameterDelta requests: real names and shapes, then any number of defects."""
    from async_ttt_ros_interfaces.srv import ApplyParameterDelta
    shapes = _shapes()
    names = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=0, max_size=4, unique=True))
    names += draw(st.lists(st.sampled_from(['', 'bn9.weight', 'stem.conv1.weight', 'bn1.bias']),
                           max_size=1))
    shapes_out = [shapes.get(n, (draw(st.integers(0, 5)),)) for n in names]
    if shapes_out and draw(st.integers(0, 4)) == 0:          # wrong shape
        i = draw(st.integers(0, len(shapes_out) - 1))
        shapes_out[i] = (max(shapes_out[i][0] + draw(st.sampled_from([-1, 1, 2])), 0),)
    ranks = [len(s) for s in shapes_out]
    dims = [max(int(d), 0) for s in shapes_out for d in s]
    size = int(sum(np.prod(s) for s in shapes_out))
    small = draw(st.booleans())
    values = np.full(size, draw(st.floats(-0.0625, 0.0625, width=32)) if small else 0.0, np.float32)
    for _ in range(draw(st.integers(0, 3)) if size else 0):
        values[draw(st.integers(0, size - 1))] = draw(VALUE)
    if draw(st.integers(0, 5)) == 0:                         # inconsistent wire form
        choice = draw(st.sampled_from(['ranks', 'dims', 'values']))
        if choice == 'ranks':
            ranks.append(draw(st.integers(0, 3)))
        elif choice == 'dims':
            dims.append(draw(st.integers(0, 100)))
        else:
            values = np.append(values, np.float32(0.0))
    req = ApplyParameterDelta.Request()
    req.delta_id = draw(st.one_of(st.uuids().map(lambda u: u.hex), st.sampled_from(['', 'dup'])))
    req.base_version = draw(st.sampled_from(base_choices))
    req.names = names
    req.ranks = array.array('I', ranks)
    req.dims = array.array('I', dims)
    req.values = array.array('f', values.tobytes())
    req.signature = draw(st.one_of(st.just(b''), st.binary(max_size=40)))
    return req


def _bytes(served):
    version, state = served.state()
    return version, {k: v.tobytes() for k, v in state.items()}


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_refused_deltas_change_nothing_accepted_ones_exactly_the_delta(served_model, data):
    from async_ttt_ros.ros_conversions import DeltaFormatError, request_to_delta
    served = served_model
    version, before = _bytes(served)
    req = data.draw(delta_requests([version, version, version, max(version - 1, 0), version + 1, 2**62]))
    try:
        delta = request_to_delta(req)
    except DeltaFormatError:
        event('refused: malformed wire form')
        assert _bytes(served) == (version, before)
        return
    result = served.apply(delta)
    event('accepted' if result.accepted else 'refused: ' + result.reason.split(':')[0][:40])
    after_version, after = _bytes(served)
    if not result.accepted:
        assert result.reason and result.version == version
        assert (after_version, after) == (version, before), result.reason
        return
    assert after_version == result.version == version + 1
    for name, raw in before.items():
        old = np.frombuffer(raw, np.float32)
        if name in delta.tensors:
            expected = old + delta.tensors[name].ravel()
            assert np.frombuffer(after[name], np.float32).tobytes() == expected.tobytes()
        else:
            assert after[name] == raw, f'{name} changed but was not in the delta'


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_perception_delta_service_never_raises_and_refusals_change_nothing(perception, data):
    from async_ttt_ros_interfaces.srv import ApplyParameterDelta
    node = perception
    version, before = _bytes(node.served)
    req = data.draw(delta_requests([version, version, version + 1, 0]))
    if data.draw(st.integers(0, 9)) == 0:                    # oversized: refused before parsing
        req.values = array.array('f', bytes(4 * (node.max_delta_values + 1)))
    response = node._on_apply(req, ApplyParameterDelta.Response())
    event('accepted' if response.accepted else 'refused: ' + response.reason.split(':')[0][:30])
    after_version, after = _bytes(node.served)
    if response.accepted:
        assert after_version == response.version == version + 1
    else:
        assert response.reason and response.version == version
        assert (after_version, after) == (version, before), response.reason


@settings(max_examples=100, **SETTINGS)
@given(signature=st.binary(max_size=64), key=st.binary(min_size=1, max_size=32))
def test_signed_model_accepts_only_the_right_signature(signature, key):
    import torch
    torch.set_num_threads(1)
    from async_ttt_ros.core.delta import ParameterDelta, sign
    from async_ttt_ros.core.serving import ServedModel
    model = _signed_model()
    secret = b'the real key'
    assume(key != secret)
    served = ServedModel(model, hmac_key=secret)
    tensors = {'bn1.bias': np.full(16, 0.01, np.float32)}
    for sig in (signature, sign(ParameterDelta('x', 0, tensors), key)):
        result = served.apply(ParameterDelta('x', 0, tensors, signature=sig))
        assert not result.accepted and 'signature' in result.reason and served.version == 0
    good = ParameterDelta('x', 0, tensors)
    good.signature = sign(good, secret)
    assert served.apply(good).accepted and served.version == 1


_MODEL = {}


def _signed_model():
    import copy

    from async_ttt_ros.core.training import load_or_train
    if 'm' not in _MODEL:
        _MODEL['m'] = load_or_train('fmnist_cnn')
    return copy.deepcopy(_MODEL['m'])
