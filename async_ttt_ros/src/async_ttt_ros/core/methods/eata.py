"""'eata': efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022).

- Reliable samples: entropy below E0 = e_margin_coeff * ln C (0.4 ln C as in the paper).
- Non-redundant samples: |cosine similarity| between a sample's probabilities and a moving
  average of recent probabilities below `d_margin`. The paper's 0.05 is for 1000 classes; with
  10 classes even unrelated probability vectors have cosine ~0.3, so the default is 0.4 (the
  value used for CIFAR-10 by common re-implementations).
- Selected samples are re-weighted by exp(E0 - entropy) and their entropy minimised.
- Anti-forgetting: fisher_alpha * sum_i F_i (theta_i - theta0_i)^2 on the BN affine parameters.

Fisher information. EATA estimates it on ~2000 clean in-distribution samples. The adapter has no
clean data by default (perception only sends latents of the live stream), so: if
`fisher_latents` (e.g. latents of a small clean calibration set) are given they are used;
otherwise the Fisher is estimated at the source parameters on the *first* memory batch this
method sees (the earliest stream data), split into chunks of `fisher_chunk` samples, with the
paper's loss (cross-entropy against the model's own argmax). Either way it is computed once, at
theta0 = source, before the first update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import GradientMethod, log_num_classes, softmax_entropy


class EATA(GradientMethod):
    name = 'eata'

    def __init__(self, model, e_margin_coeff: float = 0.4, d_margin: float = 0.4,
                 fisher_alpha: float = 1.0, fisher_latents: Tensor | None = None,
                 fisher_chunk: int = 16, ema: float = 0.9, **hp):
        super().__init__(model, **hp)
        self.e_margin = float(e_margin_coeff) * log_num_classes(self.num_classes)
        self.d_margin = float(d_margin)
        self.fisher_alpha = float(fisher_alpha)
        self.fisher_chunk = int(fisher_chunk)
        self.ema = float(ema)
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher: list[Tensor] | None = None
        self.mean_probs: Tensor | None = None
        self.selected_total = 0
        if fisher_latents is not None:
            self.fisher = self._estimate_fisher(torch.as_tensor(fisher_latents, dtype=torch.float32))

    def _estimate_fisher(self, latents: Tensor) -> list[Tensor]:
        fisher = [torch.zeros_like(p) for p in self.params]
        chunks = [c for c in torch.split(latents, self.fisher_chunk) if c.shape[0] >= 2]
        if not chunks:
            return fisher
        for chunk in chunks:
            logits = self.train_forward(chunk, update_stats=False)
            loss = F.cross_entropy(logits, logits.argmax(1).detach())
            grads = torch.autograd.grad(loss, self.params)
            for f, g in zip(fisher, grads):
                f += g.detach() ** 2
        return [f / len(chunks) for f in fisher]

    def _update(self, latents: Tensor) -> dict:
        if self.fisher is None:
            self.fisher = self._estimate_fisher(latents)
        logits = self.train_forward(latents)
        ent = softmax_entropy(logits)
        reliable = ent < self.e_margin
        probs = logits.detach().softmax(1)
        keep = reliable.clone()
        if self.mean_probs is not None and reliable.any():
            cos = F.cosine_similarity(self.mean_probs.unsqueeze(0), probs, dim=1)
            keep &= cos.abs() < self.d_margin
        n_sel = int(keep.sum())
        reg = sum((f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, self.params, self.anchor))
        info = {'n_reliable': int(reliable.sum()), 'n_selected': n_sel}
        self.optimizer.zero_grad(set_to_none=True)
        if n_sel > 0:
            weight = torch.exp(self.e_margin - ent[keep].detach())
            loss = (ent[keep] * weight).mean() + self.fisher_alpha * reg
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sel_mean = probs[keep].mean(0)
            self.mean_probs = sel_mean if self.mean_probs is None else \
                self.ema * self.mean_probs + (1 - self.ema) * sel_mean
            self.selected_total += n_sel
            info['loss'] = float(loss.detach())
        else:
            info['loss'] = float(ent.mean().detach())
        info['fisher_reg'] = float(reg.detach()) if isinstance(reg, Tensor) else 0.0
        return info

    def _reset_extra(self) -> None:
        super()._reset_extra()
        self.mean_probs = None

    def hparams(self) -> dict:
        return {**super().hparams(), 'e_margin': self.e_margin, 'd_margin': self.d_margin,
                'fisher_alpha': self.fisher_alpha}
