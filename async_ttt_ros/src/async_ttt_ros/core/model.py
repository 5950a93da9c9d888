"""The perception model, split into a frozen stem and an adaptable head at a named tap point.

Why a split: the perception node runs the stem once per frame and publishes its output (the
latents); the adaptation node only needs latents + the head to compute TENT/EATA objectives, so
it never needs images. The head's BatchNorm layers are what norm/tent/eata adapt.

Both architectures are one ordered list of named layers; `tap` cuts that list. Parameter names
therefore do not depend on the tap (`head.state_dict()` keys are the layer names, e.g.
'bn2.weight'), which keeps checkpoints tap-independent and deltas meaningful across processes.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Fashion-MNIST train-set statistics (uint8 / 255).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


# ----------------------------------------------------------------------------------------------
# architectures: (ordered named layers, taps -> number of layers in the stem, default tap, shape)

def _fmnist_cnn_layers(num_classes: int) -> OrderedDict:
    # conv1 has 16 channels so the default latents (conv1 output, before its BN) are
    # 16*28*28 = 12544 floats per frame; every BN layer then stays on the adaptable side.
    return OrderedDict([
        ('conv1', nn.Conv2d(1, 16, 3, padding=1, bias=False)),
        ('bn1', nn.BatchNorm2d(16)),
        ('relu1', nn.ReLU()),
        ('conv2', nn.Conv2d(16, 32, 3, padding=1, bias=False)),
        ('bn2', nn.BatchNorm2d(32)),
        ('relu2', nn.ReLU()),
        ('pool2', nn.MaxPool2d(2)),                        # block1: 32x14x14
        ('conv3', nn.Conv2d(32, 64, 3, padding=1, bias=False)),
        ('bn3', nn.BatchNorm2d(64)),
        ('relu3', nn.ReLU()),
        ('pool3', nn.MaxPool2d(2)),                        # block2: 64x7x7
        ('flatten', nn.Flatten()),
        ('fc1', nn.Linear(64 * 7 * 7, 128, bias=False)),
        ('bn4', nn.BatchNorm1d(128)),                      # keeps a BN in the head at every tap
        ('relu4', nn.ReLU()),
        ('fc2', nn.Linear(128, num_classes)),
    ])


_FMNIST_TAPS = {'input': 'conv1', 'conv1': 'bn1', 'block1': 'conv3', 'block2': 'flatten'}


class _BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), as in torchvision's resnet18."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1))


def _camera_resnet18_layers(num_classes: int) -> OrderedDict:
    return OrderedDict([
        ('conv1', nn.Conv2d(3, 64, 7, 2, 3, bias=False)),
        ('bn1', nn.BatchNorm2d(64)),
        ('relu', nn.ReLU()),
        ('maxpool', nn.MaxPool2d(3, 2, 1)),
        ('layer1', _layer(64, 64, 1)),
        ('layer2', _layer(64, 128, 2)),
        ('layer3', _layer(128, 256, 2)),                   # 256x14x14 = 50176 floats
        ('layer4', _layer(256, 512, 2)),
        ('avgpool', nn.AdaptiveAvgPool2d(1)),
        ('flatten', nn.Flatten()),
        ('fc', nn.Linear(512, num_classes)),
    ])


# tap -> first layer of the head
_RESNET_TAPS = {'input': 'conv1', 'conv1': 'bn1', 'stem': 'layer1', 'layer1': 'layer2',
                'layer2': 'layer3', 'layer3': 'layer4'}

ARCHS = {
    # name: (layer factory, taps -> first head layer, default tap, input shape (C,H,W))
    'fmnist_cnn': (_fmnist_cnn_layers, _FMNIST_TAPS, 'conv1', (1, 28, 28)),
    'camera_resnet18': (_camera_resnet18_layers, _RESNET_TAPS, 'layer3', (3, 224, 224)),
}


def taps(arch: str) -> tuple[str, ...]:
    """Tap names valid for `arch`, from the earliest split to the latest."""
    return tuple(_arch(arch)[1])


def default_tap(arch: str) -> str:
    return _arch(arch)[2]


def _arch(arch: str):
    if arch not in ARCHS:
        raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
    return ARCHS[arch]


# ----------------------------------------------------------------------------------------------

class SplitModel(nn.Module):
    """stem (frozen, always eval) -> latents -> head (adaptable) -> logits."""

    def __init__(self, arch: str, tap: str, layers: OrderedDict, input_shape: tuple[int, int, int]):
        super().__init__()
        head_start = _arch(arch)[1][tap]
        names = list(layers)
        cut = names.index(head_start)
        self.arch = arch
        self.tap = tap
        self.input_shape = tuple(input_shape)
        self.stem = nn.Sequential(OrderedDict((n, layers[n]) for n in names[:cut]))
        self.head = nn.Sequential(OrderedDict((n, layers[n]) for n in names[cut:]))
        # Metadata filled in by training.load_or_train (clean accuracy, config, pretrained flag).
        self.pretrained = False
        self._latent_shape: tuple[int, ...] | None = None
        self.meta: dict = {'arch': arch, 'tap': tap, 'pretrained': False, 'clean_accuracy': None}
        self.freeze_stem()

    # The stem never learns and never updates BN statistics: latents sent by perception
    # must mean the same thing to the adapter whatever mode the head is in.
    def freeze_stem(self) -> None:
        for p in self.stem.parameters():
            p.requires_grad_(False)
        self.stem.eval()

    def train(self, mode: bool = True) -> 'SplitModel':
        super().train(mode)
        self.stem.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def classify(self, z: Tensor) -> Tensor:
        return self.head(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one frame's latents (without the batch dimension)."""
        if self._latent_shape is None:        # one dry run of the stem, then cached
            with torch.no_grad():
                z = self.stem.eval()(torch.zeros(1, *self.input_shape))
            self._latent_shape = tuple(z.shape[1:])
        return self._latent_shape

    @property
    def clean_accuracy(self) -> float | None:
        return self.meta.get('clean_accuracy')

    def full_state_dict(self) -> dict[str, Tensor]:
        """All weights keyed by layer name (tap-independent: what checkpoints store)."""
        out = {}
        for part in (self.stem, self.head):
            out.update(part.state_dict())
        return out

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        stem_keys = set(self.stem.state_dict())
        head_keys = set(self.head.state_dict())
        missing = (stem_keys | head_keys) - set(state)
        unexpected = set(state) - (stem_keys | head_keys)
        if missing or unexpected:
            raise ValueError(f'checkpoint does not fit {self.arch}: missing {sorted(missing)[:5]}, '
                             f'unexpected {sorted(unexpected)[:5]}')
        self.stem.load_state_dict({k: v for k, v in state.items() if k in stem_keys})
        self.head.load_state_dict({k: v for k, v in state.items() if k in head_keys})

    def info(self) -> dict:
        """Short description for reports (says whether the weights are trained)."""
        return {'arch': self.arch, 'tap': self.tap, 'input_shape': list(self.input_shape),
                'latent_shape': list(self.latent_shape), 'pretrained': self.pretrained,
                'trained': self.meta.get('clean_accuracy') is not None,
                'clean_accuracy': self.meta.get('clean_accuracy'),
                'stem_params': sum(p.numel() for p in self.stem.parameters()),
                'head_params': sum(p.numel() for p in self.head.parameters())}


def build_model(arch: str = 'fmnist_cnn', tap: str | None = None,
                num_classes: int = 10) -> SplitModel:
    """A freshly initialised SplitModel (use training.load_or_train for trained weights).

    Initialisation uses torch's global RNG: seed it (torch.manual_seed) for reproducible weights.
    """
    factory, arch_taps, default, shape = _arch(arch)
    tap = default if tap is None else tap
    if tap not in arch_taps:
        raise ValueError(f'unknown tap {tap!r} for {arch}; choose one of {list(arch_taps)}')
    return SplitModel(arch, tap, factory(num_classes), shape)


# ----------------------------------------------------------------------------------------------
# adaptable state: what deltas carry

def bn_layers(model: SplitModel) -> list[tuple[str, nn.Module]]:
    """(name, module) of the BatchNorm layers of the head, in order."""
    return [(n, m) for n, m in model.head.named_modules() if isinstance(m, _BN_TYPES)]


_BN_ENTRIES = ('weight', 'bias', 'running_mean', 'running_var')


def adaptable_state(model: SplitModel) -> dict[str, Tensor]:
    """Detached clones of the head's BN weight, bias, running_mean, running_var.

    Names are `head.state_dict()` keys (e.g. 'bn1.weight'); num_batches_tracked is left out
    (an integer counter, not a parameter worth shipping).
    """
    state = {}
    for name, bn in bn_layers(model):
        for entry in _BN_ENTRIES:
            tensor = getattr(bn, entry)
            if tensor is not None:
                state[f'{name}.{entry}'] = tensor.detach().clone()
    return state


def load_adaptable_state(model: SplitModel, state: dict[str, Tensor]) -> None:
    """Copy `state` into the head in place; validates every name and shape before touching it."""
    expected = adaptable_state(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        raise ValueError(f'adaptable state does not match the model: missing {missing}, '
                         f'unexpected {unexpected}')
    converted = {}
    for name, ref in expected.items():
        value = torch.as_tensor(state[name])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f'{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}')
        if not torch.isfinite(value).all():
            raise ValueError(f'{name}: non-finite values')
        converted[name] = value.to(ref.dtype)
    modules = dict(model.head.named_modules())
    with torch.no_grad():
        for name, value in converted.items():
            layer, entry = name.rsplit('.', 1)
            getattr(modules[layer], entry).copy_(value)


# ----------------------------------------------------------------------------------------------
# preprocessing

def _to_nchw_uint8(images: np.ndarray) -> Tensor:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f'expected uint8 images, got {arr.dtype}')
    if not arr.flags.writeable:             # torch warns on read-only arrays; uint8 copy is cheap
        arr = arr.copy()
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 3:                       # [N,H,W] grey
        arr = arr[:, None]
        return torch.from_numpy(np.ascontiguousarray(arr))
    if arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):   # [N,H,W,C]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        return t[:, :3] if t.shape[1] == 4 else t       # drop alpha
    raise ValueError(f'expected [N,H,W] or [N,H,W,C] images with C in 1/3/4, got {arr.shape}')


def _center_square(x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top:top + s, left:left + s]


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    x = _center_square(x)
    # 'area' = average over source pixels: cheap, alias-free downscale (camera -> 28x28)
    mode = 'area' if x.shape[-1] >= size else 'bilinear'
    kwargs = {} if mode == 'area' else {'align_corners': False}
    return F.interpolate(x, size=(size, size), mode=mode, **kwargs)


def preprocess(images_uint8: np.ndarray, arch: str = 'fmnist_cnn') -> Tensor:
    """uint8 images [N,H,W] or [N,H,W,C] (or one [H,W]) -> normalised float32 [N,C,H,W].

    fmnist_cnn: colour is converted to grey (ITU-R BT.601 luma) and other sizes are centre-
    cropped to a square and resized to 28x28. camera_resnet18: grey is repeated to RGB, other
    sizes resized to 224x224, ImageNet normalisation.
    """
    _, _, _, shape = _arch(arch)
    channels, size = shape[0], shape[1]
    x = _to_nchw_uint8(images_uint8).float().div_(255.0)
    if channels == 1:
        if x.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        x = _resize(x, size)
        return (x - FMNIST_MEAN) / FMNIST_STD
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = _resize(x, size)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@lru_cache(maxsize=16)
def _cell_samples(side: int, size: int, per_cell: int) -> np.ndarray:
    """Pixel positions of `per_cell` evenly spaced samples inside each of `size` output cells."""
    k = np.arange(size)[:, None]
    j = np.arange(per_cell)[None, :]
    pos = ((k + (j + 0.5) / per_cell) * side / size).astype(np.int64).ravel()
    return np.minimum(pos, side - 1)


def preprocess_frame(frame: np.ndarray, arch: str = 'fmnist_cnn') -> Tensor:
    """One camera frame (HxWx3/HxWx4/HxW uint8, e.g. 640x480 rgb8) -> Tensor[1,C,H,W].

    Cheap on purpose (the perception hot path, ~0.1 ms for 640x480 -> 28x28): the centre square
    is cropped, and instead of converting every pixel to float, up to 4x4 evenly spaced samples
    per output cell are gathered (uint8) and averaged: a stratified area average, aligned with
    the output cells, so `streams.render_camera_frame` round-trips exactly.
    """
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        raise ValueError(f'expected a uint8 frame, got {arr.dtype}')
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(f'expected one HxW or HxWxC frame (C in 1/3/4), got shape {arr.shape}')
    h, w = arr.shape[:2]
    side = min(h, w)
    if side < 1:
        raise ValueError(f'empty frame {arr.shape}')
    top, left = (h - side) // 2, (w - side) // 2
    size = _arch(arch)[3][1]
    per_cell = max(1, min(4, side // size))
    pos = _cell_samples(side, size, per_cell)
    sampled = arr[np.ix_(top + pos, left + pos)] if arr.ndim == 2 else \
        arr[(top + pos)[:, None], (left + pos)[None, :]]
    x = preprocess(sampled[None], arch)          # [1,C,size*per_cell,...] -> area-resized
    return x
