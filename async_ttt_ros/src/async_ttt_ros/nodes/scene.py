"""The sim camera's scene: a Fashion-MNIST item on a moving conveyor belt, as a 640x480 frame.

ROS-free and cheap on purpose: the sim camera must hold 30 Hz on a shared 2-core machine, so
everything that does not depend on the item (belt texture, rails, vignetting, sensor noise) is
precomputed into a small pool of background frames; per frame we copy one background, paste the
item (nearest-neighbour upscaled into the tray) and add a pre-drawn noise tile.

The item is the stream's 28x28 frame *after* its corruption (noise, blur, fog, contrast ...), so
the drift lives in the pixels the camera sees. The tray region (`item_roi`) is an exact multiple
of 28 and the item is grey, so a perception node cropping that region and area-downscaling it
recovers the stream's item up to the camera's sensor noise (which averages out over 8x8 blocks).
"""
from __future__ import annotations

import numpy as np

WIDTH, HEIGHT = 640, 480
ITEM = 28


def default_item_roi(width: int = WIDTH, height: int = HEIGHT, scale: int = 8) -> list[int]:
    """[x, y, w, h] of the tray: a (28*scale)^2 square centred in the frame."""
    side = ITEM * scale
    return [(width - side) // 2, (height - side) // 2, side, side]


class SceneComposer:
    """Composes frames: background pool (precomputed) + upscaled item + sensor noise."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT, item_roi=None,
                 noise_sigma: float = 2.0, belt_speed_px: int = 6, pool: int = 16, seed: int = 0):
        self.width, self.height = int(width), int(height)
        roi = list(item_roi) if item_roi is not None and any(item_roi) else default_item_roi(
            self.width, self.height)
        x, y, w, h = (int(v) for v in roi)
        if w != h or w % ITEM or x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f'item_roi {roi} must be a square of side k*{ITEM} inside the '
                             f'{self.width}x{self.height} frame')
        self.roi = (x, y, w, h)
        self.scale = w // ITEM
        rng = np.random.default_rng(seed)
        self._backgrounds = self._make_backgrounds(rng, belt_speed_px, pool, noise_sigma)
        # Sensor noise for the tray region: int16 tiles, added then clipped per frame.
        self._noise = [np.rint(rng.normal(0.0, noise_sigma, (h, w, 1))).astype(np.int16)
                       for _ in range(4)] if noise_sigma > 0 else None

    def _make_backgrounds(self, rng, speed: int, pool: int, sigma: float) -> list[np.ndarray]:
        H, W = self.height, self.width
        x0, y0, w, h = self.roi
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        # Floor: warm grey with a soft overhead-light falloff (vignetting).
        r2 = ((xx - W / 2) / W) ** 2 + ((yy - H / 2) / H) ** 2
        light = 1.0 - 0.9 * r2
        floor = np.stack([110 * light, 104 * light, 96 * light], axis=-1)
        frames = []
        belt_top, belt_bottom = max(0, y0 - 40), min(H, y0 + h + 40)
        period = 48
        for k in range(pool):
            img = floor.copy()
            # Belt: dark rubber with transverse ridges that move by `speed` px per frame.
            phase = (xx[belt_top:belt_bottom] + k * speed) % period
            ridge = np.where(phase < 6, 18.0, 0.0)
            belt = (46 + ridge) * light[belt_top:belt_bottom]
            img[belt_top:belt_bottom] = belt[..., None] * np.array([1.0, 1.0, 1.05])
            # Steel rails along the belt edges.
            for ry in (belt_top, belt_bottom - 8):
                img[ry:ry + 8] = np.array([170.0, 172.0, 178.0]) * light[ry:ry + 8, :, None]
            if sigma > 0:
                img = img + rng.normal(0.0, sigma, img.shape)
            frame = np.clip(img + 0.5, 0, 255).astype(np.uint8)
            # Tray: black (the item's own background), with a thin light frame around it.
            frame[y0 - 3:y0 + h + 3, x0 - 3:x0 + w + 3] = 200
            frame[y0:y0 + h, x0:x0 + w] = 0
            frames.append(frame)
        return frames

    def compose(self, item: np.ndarray, index: int) -> np.ndarray:
        """One HxWx3 uint8 frame with `item` (28x28 uint8 grey) in the tray."""
        item = np.asarray(item)
        if item.shape != (ITEM, ITEM) or item.dtype != np.uint8:
            raise ValueError(f'item must be a {ITEM}x{ITEM} uint8 image, got {item.shape} {item.dtype}')
        frame = self._backgrounds[index % len(self._backgrounds)].copy()
        x, y, w, h = self.roi
        big = np.repeat(np.repeat(item, self.scale, axis=0), self.scale, axis=1)[..., None]
        if self._noise is not None:
            big = np.clip(big + self._noise[index % len(self._noise)], 0, 255).astype(np.uint8)
        frame[y:y + h, x:x + w] = big      # grey item broadcast to the 3 channels
        return frame
