"""imaging.py: Image fields <-> numpy, zero copy, every inconsistency refused with a clear error."""
import array
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from async_ttt_ros.imaging import (ENCODINGS, ImageFormatError, Roi, crop_to_model_input,
                                   image_to_numpy, numpy_to_image, to_grey, to_rgb)


def fields(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False):
    """Hand-built Image fields (no rclpy), rows padded by `pad` bytes."""
    h, w = pixels.shape[:2]
    dtype = pixels.dtype.newbyteorder('>' if bigendian else '<')
    row = np.ascontiguousarray(pixels.astype(dtype)).reshape(h, -1).view(np.uint8)
    padded = np.zeros((h, row.shape[1] + pad), np.uint8)
    padded[:, :row.shape[1]] = row
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian),
                           step=padded.shape[1], data=array.array('B', padded.tobytes()))


RNG = np.random.default_rng(0)


@pytest.mark.parametrize('encoding,shape,dtype', [
    ('rgb8', (5, 7, 3), np.uint8), ('bgr8', (5, 7, 3), np.uint8), ('rgba8', (5, 7, 4), np.uint8),
    ('bgra8', (5, 7, 4), np.uint8), ('mono8', (5, 7), np.uint8), ('mono16', (5, 7), np.uint16),
    ('32FC1', (5, 7), np.float32)])
@pytest.mark.parametrize('pad', [0, 3, 8])
@pytest.mark.parametrize('bigendian', [False, True])
def test_roundtrip_values_with_padding_and_byte_order(encoding, shape, dtype, pad, bigendian):
    if np.dtype(dtype).itemsize > 1 and pad % np.dtype(dtype).itemsize:
        pad += np.dtype(dtype).itemsize - pad % np.dtype(dtype).itemsize
    pixels = (RNG.random(shape) * 250).astype(dtype)
    view = image_to_numpy(fields(pixels, encoding, pad, bigendian))
    assert view.shape == pixels.shape
    np.testing.assert_array_equal(view.astype(dtype), pixels)


def test_view_is_zero_copy():
    pixels = RNG.integers(0, 255, (4, 6, 3), dtype=np.uint8)
    msg = fields(pixels, 'rgb8', pad=2)
    view = image_to_numpy(msg)
    assert not view.flags.owndata
    msg.data[0] = 123            # writing the message buffer shows through the view
    assert view[0, 0, 0] == 123


@pytest.mark.parametrize('change,match', [
    (dict(encoding='yuv422'), 'unsupported encoding'),
    (dict(encoding=''), 'unsupported encoding'),
    (dict(step=5), 'step 5 is smaller'),
    (dict(height=0), 'empty image'),
    (dict(width=0), 'empty image'),
    (dict(width=100000), 'implausible'),
    (dict(height=4, step=18, data=array.array('B', bytes(18 * 3))), 'expected step\\*height'),
    (dict(data=array.array('B', bytes(10))), 'data has 10 bytes'),
])
def test_inconsistent_images_are_refused(change, match):
    msg = fields(RNG.integers(0, 255, (3, 6, 3), dtype=np.uint8), 'rgb8')
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(ImageFormatError, match=match):
        image_to_numpy(msg)


def test_longer_data_than_step_times_height_is_refused():
    msg = fields(RNG.integers(0, 255, (3, 6), dtype=np.uint8), 'mono8')
    msg.data.extend([0] * 6)
    with pytest.raises(ImageFormatError, match='expected step'):
        image_to_numpy(msg)


def test_mono16_step_must_be_element_aligned():
    msg = fields(np.zeros((3, 4), np.uint16), 'mono16', pad=0)
    msg.step, msg.data = 9, array.array('B', bytes(27))
    with pytest.raises(ImageFormatError, match='multiple'):
        image_to_numpy(msg)


def test_channel_order_helpers():
    rgb = RNG.integers(0, 255, (2, 3, 3), dtype=np.uint8)
    bgr = rgb[..., ::-1].copy()
    np.testing.assert_array_equal(to_rgb(image_to_numpy(fields(bgr, 'bgr8')), 'bgr8'), rgb)
    bgra = np.concatenate([bgr, np.full((2, 3, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(to_rgb(image_to_numpy(fields(bgra, 'bgra8')), 'bgra8'), rgb)
    grey = to_grey(rgb, 'rgb8')
    expected = np.clip(rgb @ np.array([0.299, 0.587, 0.114]) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(grey, expected)
    assert to_grey(np.array([[0, 65535]], np.uint16), 'mono16').tolist() == [[0, 255]]


def test_crop_recovers_block_averaged_item():
    item = RNG.integers(0, 255, (28, 28), dtype=np.uint8)
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[128:352, 208:432] = np.repeat(np.repeat(item, 8, 0), 8, 1)[..., None]
    out = crop_to_model_input(frame, 'rgb8', Roi(208, 128, 224, 224), (1, 28, 28))
    np.testing.assert_array_equal(out, item)
    rgb = crop_to_model_input(frame, 'rgb8', Roi(208, 128, 224, 224), (3, 32, 32))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    with pytest.raises(ImageFormatError, match='does not fit'):
        crop_to_model_input(frame, 'rgb8', Roi(600, 0, 100, 100), (1, 28, 28))


def test_numpy_to_image_roundtrip_through_real_message():
    pytest.importorskip('sensor_msgs.msg')
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image
    for encoding, pixels in [('rgb8', RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
                             ('mono16', RNG.integers(0, 65535, (10, 12), dtype=np.uint16)),
                             ('32FC1', RNG.random((10, 12)).astype(np.float32))]:
        msg = numpy_to_image(pixels, encoding)
        assert msg.step == pixels.shape[1] * ENCODINGS[encoding].channels * pixels.dtype.itemsize
        assert bool(msg.is_bigendian) == (sys.byteorder == 'big' and pixels.dtype.itemsize > 1)
        back = deserialize_message(serialize_message(msg), Image)
        np.testing.assert_array_equal(image_to_numpy(back), pixels)
    with pytest.raises(ImageFormatError, match='does not match'):
        numpy_to_image(np.zeros((4, 4), np.uint8), 'rgb8')
    with pytest.raises(ImageFormatError, match='dtype'):
        numpy_to_image(np.zeros((4, 4), np.float64), '32FC1')
