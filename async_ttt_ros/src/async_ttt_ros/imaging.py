"""sensor_msgs/Image <-> numpy without copies on the hot path.

Why not cv_bridge: on real ROS installs it is fine, but it is a compiled distro package, and the
PyPI port's `cv2_to_imgmsg` is broken on numpy 2. Perception only needs a view of the pixels, so
`image_to_numpy` builds a strided numpy view straight over the message buffer, honouring `step`
(row padding) and `is_bigendian`, and refuses anything inconsistent with `ImageFormatError`
instead of reading garbage or crashing deeper in torch.

The functions take any object with the Image fields (height, width, encoding, is_bigendian, step,
data), so this module needs no rclpy import at all; `numpy_to_image` imports the message type
lazily.
"""
from __future__ import annotations

import array
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    'ENCODINGS', 'ImageFormatError', 'Roi', 'crop_to_model_input', 'image_to_numpy',
    'numpy_to_image', 'to_grey', 'to_rgb',
]

# Larger than any real camera (16k x 16k); catches uninitialised / corrupted headers early,
# before a huge allocation or an integer overflow in step*height.
MAX_DIM = 16384


class ImageFormatError(ValueError):
    """An Image message that cannot be interpreted as pixels; the message says why."""


@dataclass(frozen=True)
class _Encoding:
    dtype: np.dtype      # element type (native byte order; is_bigendian decides the view's order)
    channels: int


# The encodings of sensor_msgs/image_encodings.hpp that cameras and simulators commonly publish.
ENCODINGS: dict[str, _Encoding] = {
    'rgb8': _Encoding(np.dtype(np.uint8), 3),
    'bgr8': _Encoding(np.dtype(np.uint8), 3),
    'rgba8': _Encoding(np.dtype(np.uint8), 4),
    'bgra8': _Encoding(np.dtype(np.uint8), 4),
    'mono8': _Encoding(np.dtype(np.uint8), 1),
    'mono16': _Encoding(np.dtype(np.uint16), 1),
    '32FC1': _Encoding(np.dtype(np.float32), 1),
    # OpenCV-style aliases with the same memory layout.
    '8UC1': _Encoding(np.dtype(np.uint8), 1),
    '8UC3': _Encoding(np.dtype(np.uint8), 3),
    '16UC1': _Encoding(np.dtype(np.uint16), 1),
}


def _buffer(data) -> memoryview:
    """A flat byte view of the message's data field, without copying."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ImageFormatError('data array is not contiguous')
        return memoryview(data.reshape(-1).view(np.uint8))
    try:
        view = memoryview(data)   # array.array('B') from rclpy, bytes, bytearray
    except TypeError:
        # A plain list of ints (hand-built message): one copy is unavoidable.
        try:
            return memoryview(np.asarray(data, dtype=np.uint8))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ImageFormatError(f'data is not a byte buffer ({type(data).__name__})') from exc
    return view.cast('B') if view.format != 'B' or view.ndim != 1 else view


def image_to_numpy(msg) -> np.ndarray:
    """Zero-copy view of an Image's pixels: [H, W] for one channel, [H, W, C] otherwise.

    The view keeps the message's buffer alive; it is read-only when the buffer is (bytes).
    Multi-byte encodings are returned in the message's byte order (a non-native dtype if
    is_bigendian differs from this machine); numpy and torch conversions handle that.
    """
    encoding = str(getattr(msg, 'encoding', ''))
    spec = ENCODINGS.get(encoding)
    if spec is None:
        raise ImageFormatError(
            f'unsupported encoding {encoding!r}; supported: {", ".join(sorted(ENCODINGS))}')
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageFormatError(f'empty image: {width}x{height}')
    if height > MAX_DIM or width > MAX_DIM:
        raise ImageFormatError(f'implausible image size {width}x{height} (limit {MAX_DIM})')
    pixel_bytes = spec.dtype.itemsize * spec.channels
    row_bytes = width * pixel_bytes
    if step < row_bytes:
        raise ImageFormatError(
            f'step {step} is smaller than width*bytes_per_pixel = {width}*{pixel_bytes} = '
            f'{row_bytes} for {encoding}')
    if step % spec.dtype.itemsize:
        raise ImageFormatError(f'step {step} is not a multiple of the {encoding} element size '
                               f'{spec.dtype.itemsize}')
    if int(msg.is_bigendian) not in (0, 1):
        raise ImageFormatError(f'is_bigendian must be 0 or 1, got {int(msg.is_bigendian)}')
    buf = _buffer(msg.data)
    if len(buf) != step * height:
        raise ImageFormatError(
            f'data has {len(buf)} bytes, expected step*height = {step}*{height} = '
            f'{step * height}')
    dtype = spec.dtype.newbyteorder('>' if msg.is_bigendian else '<')
    if spec.channels == 1:
        shape, strides = (height, width), (step, dtype.itemsize)
    else:
        shape = (height, width, spec.channels)
        strides = (step, pixel_bytes, dtype.itemsize)
    # np.ndarray over the buffer with explicit strides: a view that skips the row padding.
    return np.ndarray(shape, dtype=dtype, buffer=buf, offset=0, strides=strides)


def to_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB view (or copy where unavoidable) of image_to_numpy's output."""
    if encoding in ('rgb8', '8UC3'):
        return pixels
    if encoding == 'bgr8':
        return pixels[..., ::-1]
    if encoding == 'rgba8':
        return pixels[..., :3]
    if encoding == 'bgra8':
        return pixels[..., 2::-1]
    grey = to_grey(pixels, encoding)
    return np.repeat(grey[..., None], 3, axis=2)


def to_grey(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """[H, W] uint8 luminance of image_to_numpy's output (a view for mono8)."""
    if encoding in ('mono8', '8UC1'):
        return pixels
    if encoding in ('mono16', '16UC1'):
        return (pixels.astype(np.uint16) >> 8).astype(np.uint8)
    if encoding == '32FC1':
        # Float images (depth, normalised intensity): scale the finite range to 0..255.
        # float64: hi - lo overflows float32 when values span its whole range.
        values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip((values - lo) * scale, 0, 255).astype(np.uint8)
    rgb = to_rgb(pixels, encoding).astype(np.float32)
    # ITU-R BT.601 luma, the weights OpenCV's cvtColor(RGB2GRAY) uses.
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(grey + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Roi:
    """Region of interest in pixels (x, y = top-left corner). width/height 0 = whole image."""
    x: int = 0
    y: int = 0
    width: int = 0
    height: int = 0

    def resolve(self, image_width: int, image_height: int) -> tuple[int, int, int, int]:
        width = self.width or image_width - self.x
        height = self.height or image_height - self.y
        if (self.x < 0 or self.y < 0 or width <= 0 or height <= 0
                or self.x + width > image_width or self.y + height > image_height):
            raise ImageFormatError(
                f'region of interest x={self.x} y={self.y} {width}x{height} does not fit the '
                f'{image_width}x{image_height} image')
        return self.x, self.y, width, height


def _resize(pixels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Area-average downscale (exact block mean when sizes divide), nearest for upscaling."""
    h, w = pixels.shape[:2]
    if (h, w) == (out_h, out_w):
        return pixels
    if h % out_h == 0 and w % out_w == 0:
        fy, fx = h // out_h, w // out_w
        blocks = pixels.reshape(out_h, fy, out_w, fx, *pixels.shape[2:]).astype(np.float32)
        return np.clip(blocks.mean(axis=(1, 3)) + 0.5, 0, 255).astype(np.uint8)
    ys = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return pixels[ys][:, xs]


def crop_to_model_input(pixels: np.ndarray, encoding: str, roi: Roi,
                        input_shape: tuple[int, int, int]) -> np.ndarray:
    """Camera frame -> uint8 [H, W] (1 channel) or [H, W, 3] at the model's input size.

    The region of interest is where the object is (the sim camera's tray, or a configured crop
    of a real camera); it is converted to the model's channel count and area-downscaled.
    """
    channels, out_h, out_w = input_shape
    x, y, w, h = roi.resolve(pixels.shape[1], pixels.shape[0])
    region = pixels[y:y + h, x:x + w]
    if channels == 1:
        region = to_grey(region, encoding)
    elif channels == 3:
        region = to_rgb(region, encoding)
    else:
        raise ImageFormatError(f'model expects {channels} channels; only 1 or 3 are supported')
    return np.ascontiguousarray(_resize(region, out_h, out_w))


def numpy_to_image(pixels: np.ndarray, encoding: str, header=None, msg=None):
    """numpy [H, W] or [H, W, C] -> sensor_msgs/Image (one copy into the message buffer).

    Pass `msg` to reuse a message object. The array's dtype and channel count must match the
    encoding; multi-byte data is written in this machine's byte order and flagged accordingly.
    """
    from sensor_msgs.msg import Image  # lazy: the rest of this module is ROS-free

    spec = ENCODINGS.get(encoding)
    if spec is None:
        raise ImageFormatError(
            f'unsupported encoding {encoding!r}; supported: {", ".join(sorted(ENCODINGS))}')
    pixels = np.asarray(pixels)
    channels = 1 if pixels.ndim == 2 else (pixels.shape[2] if pixels.ndim == 3 else -1)
    if channels != spec.channels:
        raise ImageFormatError(
            f'array of shape {pixels.shape} does not match {encoding} ({spec.channels} channel(s))')
    if pixels.dtype.newbyteorder('=') != spec.dtype:
        raise ImageFormatError(f'array dtype {pixels.dtype} does not match {encoding} ({spec.dtype})')
    height, width = pixels.shape[:2]
    if not (0 < height <= MAX_DIM and 0 < width <= MAX_DIM):
        raise ImageFormatError(f'implausible image size {width}x{height}')
    pixels = np.ascontiguousarray(pixels, dtype=spec.dtype.newbyteorder('='))
    msg = msg if msg is not None else Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding = int(height), int(width), encoding
    msg.is_bigendian = sys.byteorder == 'big' and spec.dtype.itemsize > 1
    msg.step = int(width * spec.channels * spec.dtype.itemsize)
    data = array.array('B')
    data.frombytes(memoryview(pixels.reshape(-1).view(np.uint8)))   # one memcpy; a list would cost ~100 ms
    msg.data = data
    return msg
