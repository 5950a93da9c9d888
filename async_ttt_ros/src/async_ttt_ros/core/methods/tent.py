"""'tent': entropy minimisation on BN affine parameters (Wang et al., ICLR 2021).

One gradient step per memory batch on the mean softmax entropy, BN in train mode (batch
statistics), only BN weight/bias trainable; Adam lr 1e-3 as the paper uses for CIFAR (SGD is an
option). Running statistics follow the batch statistics (base.py schedule) so the served eval-mode
model sees what TENT trained with.
"""
from __future__ import annotations

from torch import Tensor

from .base import GradientMethod, softmax_entropy


class Tent(GradientMethod):
    name = 'tent'

    def _update(self, latents: Tensor) -> dict:
        logits = self.train_forward(latents)
        loss = softmax_entropy(logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {'loss': float(loss.detach()), 'n_selected': int(latents.shape[0])}
