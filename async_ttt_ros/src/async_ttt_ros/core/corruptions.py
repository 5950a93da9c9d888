"""ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) on maintained libraries.

Reference: PyPI `imagecorruptions` 1.1.2 (the same definitions and severity constants). That
package is unmaintained (needs numpy<2, scipy<1.14, scikit-image<0.20), so the definitions are
re-implemented here with numpy, scipy.ndimage, OpenCV and Pillow, batched over N images, with
randomness from an explicit `numpy.random.Generator`. `scripts/make_corruption_reference.py`
runs the reference in an isolated venv and `test/test_corruptions.py` compares against it.

Protocol for Fashion-MNIST (DESIGN.md): 28x28 grey is zero-padded to 32x32 (the reference needs
>= 32 px), replicated to RGB as `imagecorruptions.corrupt` does, corrupted, truncated to uint8
(the reference's `np.uint8(...)`), converted back to grey (ITU-R BT.601 luma, as PIL's
convert('L')) and cropped to 28x28. For the deterministic corruptions the three channels stay
identical, so they are computed on one channel (same result, a third of the work); the noises
draw independent noise per RGB channel, exactly like the reference, so their effective strength
after the grey conversion is the reference's.
"""
from __future__ import annotations

import io
from typing import Callable

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

# ImageNet-C order (the 15 "common" corruptions we implement, plus validation ones we have).
CORRUPTIONS: tuple[str, ...] = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'zoom_blur', 'fog',
    'brightness', 'contrast', 'pixelate', 'jpeg_compression', 'speckle_noise', 'gaussian_blur',
)
# The default drift set: 10 corruptions across noise, blur, weather and digital.
DEFAULT_CORRUPTIONS: tuple[str, ...] = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'gaussian_blur', 'fog',
    'brightness', 'contrast', 'jpeg_compression', 'pixelate',
)
# Corruptions that draw random numbers (the others are deterministic functions of the image).
RANDOM_CORRUPTIONS = frozenset({'gaussian_noise', 'shot_noise', 'impulse_noise',
                                'speckle_noise', 'fog'})
# Those whose reference output differs per RGB channel of a grey input (independent noise, or
# JPEG's colour transform): computed on 3 channels then converted to grey.
_PER_CHANNEL = frozenset({'gaussian_noise', 'shot_noise', 'impulse_noise', 'speckle_noise',
                          'jpeg_compression'})

# Severity constants, verbatim from imagecorruptions 1.1.2 (corruptions.py).
SEVERITY = {
    'gaussian_noise': [.08, .12, 0.18, 0.26, 0.38],
    'shot_noise': [60, 25, 12, 5, 3],
    'impulse_noise': [.03, .06, .09, 0.17, 0.27],
    'speckle_noise': [.15, .2, 0.35, 0.45, 0.6],
    'gaussian_blur': [1, 2, 3, 4, 6],
    'defocus_blur': [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    'zoom_blur': [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                  np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)],
    'fog': [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)],
    'brightness': [.1, .2, .3, .4, .5],
    'contrast': [0.4, .3, .2, .1, .05],
    'jpeg_compression': [25, 18, 15, 10, 7],
    'pixelate': [0.6, 0.5, 0.4, 0.3, 0.25],
}


def _check(name: str, severity: int) -> None:
    if name not in _FUNCS:
        raise ValueError(f'unknown corruption {name!r}; choose one of {list(CORRUPTIONS)}')
    if not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ValueError(f'severity must be an integer in 1..5, not {severity!r}')


def _to_uint8(x: np.ndarray) -> np.ndarray:
    # The reference ends with np.uint8(clip(x, 0, 1) * 255): truncation, not rounding.
    return np.clip(x, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------- noise (per channel)
# All functions: x uint8 [N,H,W,C] -> uint8 [N,H,W,C].

def _gaussian_noise(x, c, rng):
    x = x / 255.
    return _to_uint8(np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255)


def _shot_noise(x, c, rng):
    x = x / 255.
    return _to_uint8(np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255)


def _impulse_noise(x, c, rng):
    # skimage.util.random_noise(mode='s&p', amount=c, salt_vs_pepper=0.5)
    x = x / 255.
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.
    x[flipped & ~salted] = 0.
    return _to_uint8(x * 255)


def _speckle_noise(x, c, rng):
    x = x / 255.
    return _to_uint8(np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255)


# -------------------------------------------------------------------------- blur

def _gaussian_blur(x, c, rng):
    # skimage.filters.gaussian: scipy gaussian_filter, mode 'nearest', truncate 4, no blur
    # across the batch or channel axes.
    x = x / 255.
    out = ndimage.gaussian_filter(x, sigma=(0, c, c, 0), mode='nearest', truncate=4.0)
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    if radius <= 8:
        coords = np.arange(-8, 8 + 1)
        ksize = (3, 3)
    else:
        coords = np.arange(-radius, radius + 1)
        ksize = (5, 5)
    xx, yy = np.meshgrid(coords, coords)
    aliased = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    aliased /= np.sum(aliased)
    return cv2.GaussianBlur(aliased, ksize=ksize, sigmaX=alias_blur)


def _filter2d_batch(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D (BORDER_REFLECT_101) on every image/channel; images stacked as channels."""
    n, h, w, ch = x.shape
    planes = x.transpose(1, 2, 0, 3).reshape(h, w, n * ch)
    out = np.empty_like(planes)
    step = 512                                   # OpenCV's maximum channel count
    for i in range(0, planes.shape[2], step):
        chunk = np.ascontiguousarray(planes[:, :, i:i + step])
        res = cv2.filter2D(chunk, -1, kernel)
        out[:, :, i:i + step] = res.reshape(h, w, -1)
    return out.reshape(h, w, n, ch).transpose(2, 0, 1, 3)


def _defocus_blur(x, c, rng):
    x = x / 255.
    kernel = _disk(radius=c[0], alias_blur=c[1])
    return _to_uint8(np.clip(_filter2d_batch(x, kernel), 0, 1) * 255)


def _clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Centre crop then scipy zoom (order 1) of a batch [N,H,W,C] (reference: per image)."""
    h, w = img.shape[1:3]
    ch0 = int(np.ceil(h / float(zoom_factor)))
    top0 = (h - ch0) // 2
    ch1 = int(np.ceil(w / float(zoom_factor)))
    top1 = (w - ch1) // 2
    crop = img[:, top0:top0 + ch0, top1:top1 + ch1]
    return ndimage.zoom(crop, (1, zoom_factor, zoom_factor, 1), order=1)


def _zoom_blur(x, c, rng):
    x = (x / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in c:
        layer = _clipped_zoom(x, zoom_factor)[:, :x.shape[1], :x.shape[2]]
        out[:, :layer.shape[1], :layer.shape[2]] += layer
    x = (x + out) / (len(c) + 1)
    return _to_uint8(np.clip(x, 0, 1) * 255)


# -------------------------------------------------------------------------- weather

def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng) -> np.ndarray:
    """Diamond-square heightmaps [n, mapsize, mapsize] in [0,1] (reference: one at a time)."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares
        corner = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        acc = corner + np.roll(corner, shift=-1, axis=1)
        acc += np.roll(acc, shift=-1, axis=2)
        maparray[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(acc)
        # diamonds
        dr = maparray[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        maparray[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        maparray[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min(axis=(1, 2), keepdims=True)
    return maparray / maparray.max(axis=(1, 2), keepdims=True)


def _fog(x, c, rng):
    n, h, w, _ = x.shape
    max_side = max(h, w, x.shape[3] if x.ndim == 4 else 0)
    map_size = 1 if max_side == 0 else 2 ** (int(max_side) - 1).bit_length()
    x = x / 255.
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + c[0] * _plasma_fractal(n, map_size, c[1], rng)[:, :h, :w, None]
    return _to_uint8(np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255)


def _brightness(x, c, rng):
    # Reference: HSV value + c. For grey (equal channels) that is grey + c; for colour we use
    # OpenCV's HSV (same definition, V = max channel) to avoid scikit-image.
    x = x / 255.
    if x.shape[-1] == 1 or np.array_equal(x[..., :1].repeat(x.shape[-1], -1), x):
        return _to_uint8(np.clip(x + c, 0, 1) * 255)
    out = np.empty_like(x)
    for i in range(len(x)):
        hsv = cv2.cvtColor(x[i].astype(np.float32), cv2.COLOR_RGB2HSV)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        out[i] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _contrast(x, c, rng):
    x = x / 255.
    means = np.mean(x, axis=(1, 2), keepdims=True)
    return _to_uint8(np.clip((x - means) * c + means, 0, 1) * 255)


# -------------------------------------------------------------------------- digital (Pillow)

def _pil_mode(ch: int) -> str:
    return {1: 'L', 3: 'RGB'}[ch]


def _jpeg_compression(x, c, rng):
    out = np.empty_like(x)
    for i in range(len(x)):
        img = Image.fromarray(x[i] if x.shape[-1] == 3 else x[i, ..., 0], _pil_mode(x.shape[-1]))
        buf = io.BytesIO()
        img.save(buf, 'JPEG', quality=c)
        buf.seek(0)
        dec = np.asarray(Image.open(buf))
        out[i] = dec if dec.ndim == 3 else dec[..., None]
    return out


def _pixelate(x, c, rng):
    n, h, w, ch = x.shape
    small = (int(w * c), int(h * c))
    out = np.empty_like(x)
    for i in range(n):
        img = Image.fromarray(x[i] if ch == 3 else x[i, ..., 0], _pil_mode(ch))
        img = img.resize(small, Image.BOX).resize((w, h), Image.NEAREST)
        arr = np.asarray(img)
        out[i] = arr if arr.ndim == 3 else arr[..., None]
    return out


_FUNCS: dict[str, Callable] = {
    'gaussian_noise': _gaussian_noise, 'shot_noise': _shot_noise,
    'impulse_noise': _impulse_noise, 'speckle_noise': _speckle_noise,
    'gaussian_blur': _gaussian_blur, 'defocus_blur': _defocus_blur, 'zoom_blur': _zoom_blur,
    'fog': _fog, 'brightness': _brightness, 'contrast': _contrast,
    'jpeg_compression': _jpeg_compression, 'pixelate': _pixelate,
}
assert set(_FUNCS) == set(CORRUPTIONS)


# -------------------------------------------------------------------------- public API

def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [...,3] -> uint8 grey, exactly as PIL's convert('L') (ITU-R BT.601, rounded)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def corrupt_images(images: np.ndarray, name: str, severity: int,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply one corruption to uint8 images of any size >= 32x32, like imagecorruptions.corrupt.

    images: [H,W], [H,W,C], [N,H,W] (grey batch) or [N,H,W,C] with C in (1, 3); returns the same
    shape, uint8. `rng` is required for the random corruptions (explicit seeding).
    """
    _check(name, severity)
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f'expected uint8 images, got {arr.dtype}')
    shape = arr.shape
    if arr.ndim == 2:
        batch = arr[None, ..., None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] >= 32 and arr.shape[1] >= 32:
        batch = arr[None]
    elif arr.ndim == 3:
        batch = arr[..., None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        batch = arr
    else:
        raise ValueError(f'unsupported image shape {shape}')
    if batch.shape[1] < 32 or batch.shape[2] < 32:
        raise ValueError(f'images must be at least 32x32 (the reference requires it), got {shape}'
                         ' — use corrupt() for 28x28 Fashion-MNIST')
    if name in RANDOM_CORRUPTIONS and rng is None:
        raise ValueError(f'{name} is random: pass an explicit numpy Generator (rng=...)')
    if len(batch) == 0:
        return arr.copy()
    c = SEVERITY[name][int(severity) - 1]
    out = _FUNCS[name](np.ascontiguousarray(batch), c, rng)
    return out.reshape(shape)


def corrupt(images: np.ndarray, name: str, severity: int,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Fashion-MNIST protocol: uint8 [N,28,28] (or [28,28]) -> corrupted uint8 of the same shape.

    Pad to 32x32 with zeros, corrupt as RGB (see module doc), truncate, grey, crop back.
    """
    _check(name, severity)
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f'expected uint8 images, got {arr.dtype}')
    single = arr.ndim == 2
    batch = arr[None] if single else arr
    if batch.ndim != 3:
        raise ValueError(f'expected [N,H,W] grey images, got shape {arr.shape}')
    if name in RANDOM_CORRUPTIONS and rng is None:
        raise ValueError(f'{name} is random: pass an explicit numpy Generator (rng=...)')
    if len(batch) == 0:
        return arr.copy()
    h, w = batch.shape[1:]
    ph, pw = max(0, 32 - h), max(0, 32 - w)
    top, left = ph // 2, pw // 2
    padded = np.pad(batch, ((0, 0), (top, ph - top), (left, pw - left)))
    channels = 3 if name in _PER_CHANNEL else 1
    x = np.repeat(padded[..., None], channels, axis=-1)
    out = _FUNCS[name](x, SEVERITY[name][int(severity) - 1], rng)
    grey = luma(out) if channels == 3 else out[..., 0]
    grey = np.ascontiguousarray(grey[:, top:top + h, left:left + w])
    return grey[0] if single else grey
