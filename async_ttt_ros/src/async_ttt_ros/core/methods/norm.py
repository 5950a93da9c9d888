"""'norm': test-time BatchNorm statistics (Schneider et al. 2020; Nado et al. 2020).

Only the BN running statistics change; affine parameters stay at the source. The statistics move
towards each memory batch with the momentum schedule of base.py, so a batch-size-1 stream (whose
frames are batched by the memory) ends up served with target statistics in eval mode. This
variant (running-statistics update, not predicting with per-batch statistics) is the one that
works with asynchronous serving: the served model never needs a batch of its own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import AdaptationMethod, softmax_entropy


class Norm(AdaptationMethod):
    name = 'norm'

    def __init__(self, model, **hp):
        super().__init__(model, **hp)
        for p in self.model.head.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _update(self, latents: Tensor) -> dict:
        momentum = self._momentum()
        logits = self.train_forward(latents)
        return {'loss': float(softmax_entropy(logits).mean()), 'momentum': momentum,
                'n_selected': int(latents.shape[0])}
