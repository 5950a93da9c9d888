"""'source': no adaptation (the baseline every method is compared with)."""
from __future__ import annotations

from torch import Tensor

from .base import AdaptationMethod, softmax_entropy


class Source(AdaptationMethod):
    name = 'source'
    adapts = False

    def _update(self, latents: Tensor) -> dict:
        ent = softmax_entropy(self.eval_logits(latents))
        return {'loss': float(ent.mean()), 'n_selected': 0}
