"""Reproducible source-model training with a checkpoint cache keyed by the training config.

Why a cache: every node, test and evaluation needs the same trained source model; training it
takes minutes on 2 CPU cores, loading it milliseconds. The key hashes everything that changes
the weights (arch, epochs, seed, batch size, learning rate, data, code version) so a change in
any of them trains a new model instead of silently reusing a stale one. Weights are stored
tap-independent (keyed by layer name), so one checkpoint serves every tap.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_torch_save
from .data import load_fashion_mnist
from .model import SplitModel, build_model, preprocess

# Bump when anything in this module or in the architectures changes the trained weights.
TRAINING_VERSION = 'fmnist_cnn-v1'
CACHE_ENV = 'ASYNC_TTT_CACHE'

DEFAULT_HPARAMS = {'batch_size': 128, 'lr': 2e-3, 'weight_decay': 5e-4}


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: `path`, else $ASYNC_TTT_CACHE, else ~/.cache/async_ttt_ros."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'async_ttt_ros'
    return Path(path).expanduser()


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def training_config(arch: str, epochs: int, seed: int, n_train: int | None = None) -> dict:
    return {'arch': arch, 'epochs': int(epochs), 'seed': int(seed), 'n_train': n_train,
            'version': TRAINING_VERSION, **DEFAULT_HPARAMS}


def checkpoint_path(arch: str = 'fmnist_cnn', epochs: int = 2, seed: int = 0,
                    cache_dir_: str | os.PathLike | None = None) -> Path:
    cfg = training_config(arch, epochs, seed)
    name = f'{arch}-e{epochs}-s{seed}-{config_hash(cfg)}.pt'
    return resolve_cache_dir(cache_dir_) / 'models' / name


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:                      # tqdm is optional for the library
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def evaluate_accuracy(model: SplitModel, images: np.ndarray, labels: np.ndarray,
                      batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (source BN statistics)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            logits = model(preprocess(images[i:i + batch_size], model.arch))
            correct += int((logits.argmax(1).numpy() == labels[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def train_model(images: np.ndarray, labels: np.ndarray, arch: str = 'fmnist_cnn',
                epochs: int = 2, seed: int = 0, progress: bool = False,
                log: Callable[[str], None] | None = None) -> SplitModel:
    """Train from scratch on (images uint8 [N,28,28], labels); deterministic for a given seed.

    Trains the whole network (tap 'input': empty stem) and returns it; callers re-split it
    with `build_model(arch, tap)` + `load_full_state_dict`.
    """
    if arch != 'fmnist_cnn':
        raise ValueError(f'training is implemented for fmnist_cnn only, not {arch!r}')
    if epochs < 1:
        raise ValueError('epochs must be >= 1')
    # CPU float reductions are summed in a thread-count-dependent order, so the same seed gives
    # different weights on 1 and 2 threads. Training always on one thread makes the checkpoint a
    # function of (config, seed) alone: every machine and every caller gets the same model.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, arch, epochs, seed, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train(images, labels, arch, epochs, seed, progress, log) -> SplitModel:
    hp = DEFAULT_HPARAMS
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(arch, tap='input')
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=hp['lr'], weight_decay=hp['weight_decay'])
    n = len(images)
    bs = hp['batch_size']
    steps_per_epoch = n // bs                  # drop the last partial batch (BatchNorm1d)
    if steps_per_epoch < 1:
        raise ValueError(f'need at least {bs} training images, got {n}')
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp['lr'],
                                                total_steps=epochs * steps_per_epoch)
    x_all = preprocess(images)                 # [N,1,28,28] float32, ~190 MB for 60k
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64))   # copy: torch wants writable
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        # cheap augmentation: random horizontal flips (clothing is left/right symmetric)
        flips = torch.from_numpy(rng.random(n) < 0.5)
        running, seen = 0.0, 0
        bar = _progress(range(steps_per_epoch), steps_per_epoch,
                        f'epoch {epoch + 1}/{epochs}', progress)
        for step in bar:
            idx = order[step * bs:(step + 1) * bs]
            x = x_all[idx]
            f = flips[idx]
            x[f] = x[f].flip(-1)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if progress and hasattr(bar, 'set_postfix') and step % 20 == 0:
                bar.set_postfix(loss=f'{running / seen:.3f}')
        if log:
            log(f'epoch {epoch + 1}/{epochs}: train loss {running / max(1, seen):.4f}')
    model.eval()
    return model


def _atomic_save(obj, path: Path) -> None:
    atomic_torch_save(obj, path)


def _split(full: SplitModel, arch: str, tap: str | None, meta: dict) -> SplitModel:
    model = build_model(arch, tap)
    model.load_full_state_dict(full.full_state_dict() if isinstance(full, SplitModel) else full)
    model.meta = {**meta, 'tap': model.tap}
    model.pretrained = bool(meta.get('pretrained', False))
    model.eval()
    return model


def load_or_train(arch: str = 'fmnist_cnn', tap: str | None = None, epochs: int = 2,
                  seed: int = 0, cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = print, progress: bool = False,
                  retrain: bool = False) -> SplitModel:
    """The trained source model, split at `tap`, in eval() mode; trains and caches it if needed.

    `model.meta` holds the config, 'clean_accuracy' (measured on the 10k test set when it was
    trained) and 'pretrained'. camera_resnet18 is never trained here (no ImageNet-scale data
    or GPU): it returns seeded random weights with meta['pretrained'] = False and
    meta['clean_accuracy'] = None, so reports can say "untrained".
    """
    log = log or (lambda _msg: None)
    if arch == 'camera_resnet18':
        with torch.random.fork_rng():          # seeded weights without touching the caller's RNG
            torch.manual_seed(seed)
            model = build_model(arch, tap)
        model.meta = {'arch': arch, 'tap': model.tap, 'seed': seed, 'pretrained': False,
                      'trained': False, 'clean_accuracy': None}
        model.eval()
        log(f'{arch}: untrained weights (seed {seed}); use it for latency work only')
        return model
    build_model(arch, tap)   # validate arch/tap first: a bad tap must not look like a bad cache
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f'epochs must be a positive integer, not {epochs!r}')
    epochs, seed = int(epochs), int(seed)
    cfg = training_config(arch, epochs, seed)
    path = checkpoint_path(arch, epochs, seed, cache_dir)
    if not retrain:
        model = _load_cached(path, cfg, arch, tap, log)
        if model is not None:
            return model
    # Several processes (nodes, tests, evaluators) may ask at once: one trains, the others wait
    # on the lock and then load what it wrote.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix('.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not retrain:
                model = _load_cached(path, cfg, arch, tap, log)
                if model is not None:
                    return model
            return _train_and_cache(path, cfg, arch, tap, epochs, seed, progress, log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_cached(path: Path, cfg: dict, arch: str, tap: str | None, log) -> SplitModel | None:
    if not path.is_file():
        return None
    model = build_model(arch, tap)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        meta = ckpt['meta']
        if meta.get('config') != cfg:
            log(f'{path}: config mismatch ({meta.get("config")} != {cfg}), retraining')
            return None
        model.load_full_state_dict(ckpt['state_dict'])
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
            AttributeError, pickle.UnpicklingError) as exc:
        # truncated/foreign file: retrain and overwrite it atomically
        log(f'{path}: unreadable checkpoint ({type(exc).__name__}: {exc}), retraining')
        return None
    model.meta = {**meta, 'tap': model.tap, 'checkpoint': str(path)}
    model.eval()
    return model


def _train_and_cache(path: Path, cfg: dict, arch: str, tap: str | None, epochs: int, seed: int,
                     progress: bool, log) -> SplitModel:
    log(f'training {arch} (epochs={epochs}, seed={seed}) -> {path}')
    t0 = time.perf_counter()
    train_x, train_y = load_fashion_mnist('train')
    full = train_model(train_x, train_y, arch, epochs, seed, progress=progress, log=log)
    train_s = time.perf_counter() - t0
    test_x, test_y = load_fashion_mnist('test')
    acc = evaluate_accuracy(full, test_x, test_y)
    meta = {'arch': arch, 'config': cfg, 'config_hash': config_hash(cfg), 'epochs': epochs,
            'seed': seed, 'clean_accuracy': acc, 'train_seconds': round(train_s, 1),
            'torch_threads': 1, 'torch_version': str(torch.__version__),
            'pretrained': False, 'trained': True, 'created': time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                                           time.gmtime())}
    _atomic_save({'state_dict': full.full_state_dict(), 'meta': meta}, path)
    log(f'clean test accuracy {acc * 100:.2f} % (trained in {train_s:.0f} s), cached at {path}')
    model = _split(full, arch, tap, meta)
    model.meta['checkpoint'] = str(path)
    return model
