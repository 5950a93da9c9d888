"""AdaptationMethod: the common base of every test-time adaptation method.

A method works on *latents* (the frozen stem's output) and on the adapter's own copy of the
SplitModel; it only ever changes the head's adaptable state (BN statistics and affine
parameters). The served model predicts in eval mode, i.e. with BN *running* statistics, because
perception may see one frame at a time. So every method keeps the running statistics in step with
what it learns: BN layers run in train mode during a step (batch statistics, as TENT does) and
their running statistics move towards the memory batch with a momentum schedule (below).

Momentum schedule: m_t = max(min_momentum, 1 / (t + 1 + prior)). With prior = 0 the first step
replaces the source statistics by those of the first memory batch, later steps average
cumulatively until the floor `min_momentum` turns it into an exponential moving average.
`prior` > 0 keeps some weight on the source statistics (Schneider et al. 2020); it only matters
when min_momentum < 1.

Default min_momentum = 1.0: the served running statistics are those of the newest training
batch, which is what TENT/EATA/SAR and test-time BN use (they normalise with the statistics of
the current test batch, `track_running_stats=False`). Measured on the continual severity-5 stream
(10 corruptions x 1000 frames, batches of 64 newest latents, predict then adapt): norm 52.1 /
58.5 / 59.0 % online with min_momentum 0.1 / 0.5 / 1.0, tent 53.2 / 59.3 / 60.2 %. A slow
average keeps the previous corruption's statistics for ~10 steps after every shift (the
jpeg_compression segment after contrast lost 8-14 points vs source that way).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import SplitModel, adaptable_state, bn_layers, load_adaptable_state


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of softmax(logits), in nats."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


class AdaptationMethod:
    """Base class: owns nothing but references to the model it adapts.

    Subclasses implement `_update(latents) -> dict`. `step` wraps it with input checks and the
    step counter; `reset` brings the model (and any optimiser/EMA state) back to the source.
    """

    name = 'base'
    #: whether step() changes anything at all (False only for 'source')
    adapts = True

    def __init__(self, model: SplitModel, min_momentum: float = 1.0, prior: float = 0.0, **hparams):
        if hparams:
            raise TypeError(f'{type(self).__name__}: unknown hyper-parameters {sorted(hparams)}')
        if not 0.0 < min_momentum <= 1.0:
            raise ValueError(f'min_momentum must be in (0, 1], got {min_momentum}')
        self.model = model
        self.min_momentum = float(min_momentum)
        self.prior = float(prior)
        self.source_state = adaptable_state(model)
        self.num_classes = self._num_classes()
        self.steps = 0            # successful updates since construction
        self.stat_steps = 0       # updates of the running statistics since the last reset
        self.resets = 0
        model.eval()

    def _num_classes(self) -> int:
        last = [m for m in self.model.head.modules() if isinstance(m, nn.Linear)]
        return int(last[-1].out_features) if last else 10

    # -- helpers for subclasses ------------------------------------------------------------------
    def bn_modules(self) -> list[nn.Module]:
        return [m for _, m in bn_layers(self.model)]

    def bn_affine_params(self) -> list[nn.Parameter]:
        params = []
        for m in self.bn_modules():
            for p in (m.weight, m.bias):
                if p is not None:
                    params.append(p)
        return params

    def configure_params(self, params: list[nn.Parameter]) -> None:
        """Only `params` get gradients (the rest of the head is frozen during adaptation)."""
        keep = {id(p) for p in params}
        for p in self.model.head.parameters():
            p.requires_grad_(id(p) in keep)

    def _momentum(self) -> float:
        return max(self.min_momentum, 1.0 / (self.stat_steps + 1.0 + self.prior))

    def train_forward(self, latents: Tensor, update_stats: bool = True) -> Tensor:
        """Head forward with BN in train mode (batch statistics); running stats move with m_t."""
        m = self._momentum() if update_stats else 0.0
        for bn in self.bn_modules():
            bn.momentum = m
        self.model.head.train()
        try:
            logits = self.model.classify(latents)
        finally:
            self.model.eval()
        if update_stats:
            self.stat_steps += 1
        return logits

    @torch.no_grad()
    def eval_logits(self, latents: Tensor) -> Tensor:
        self.model.eval()
        return self.model.classify(latents)

    # -- public API --------------------------------------------------------------------------------
    def step(self, latents: Tensor) -> dict:
        """One update from a batch of latents [N, *latent_shape]; returns an info dict."""
        if not isinstance(latents, Tensor):
            latents = torch.as_tensor(latents)
        if latents.dim() < 2 or latents.shape[0] < 2:
            # BN in train mode needs >= 2 samples for a variance; memory batches are larger.
            return {'method': self.name, 'skipped': True, 'reason': 'need a batch of >= 2 latents'}
        info = self._update(latents.to(torch.float32))
        self.steps += 1
        info.setdefault('method', self.name)
        info.setdefault('n', int(latents.shape[0]))
        return info

    def _update(self, latents: Tensor) -> dict:
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the source state (parameters, running statistics, optimiser, EMAs)."""
        load_adaptable_state(self.model, self.source_state)
        self.stat_steps = 0
        self.resets += 1
        self._reset_extra()

    def adopt_state(self, state: dict) -> None:
        """Load an adaptable state from outside (rollback/resync): keeps counters, clears optimiser
        moments (they belong to the trajectory that was abandoned)."""
        load_adaptable_state(self.model, state)
        self._reset_optimizer()

    def _reset_extra(self) -> None:
        self._reset_optimizer()

    def _reset_optimizer(self) -> None:
        pass

    def hparams(self) -> dict:
        return {'min_momentum': self.min_momentum, 'prior': self.prior}


class GradientMethod(AdaptationMethod):
    """Base for methods that optimise BN affine parameters by gradient descent."""

    def __init__(self, model: SplitModel, lr: float = 1e-3, optimizer: str = 'adam',
                 momentum: float = 0.9, weight_decay: float = 0.0, **hp):
        super().__init__(model, **hp)
        if optimizer not in ('adam', 'sgd'):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.sgd_momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.params = self.bn_affine_params()
        self.configure_params(self.params)
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == 'adam':
            return torch.optim.Adam(self.params, lr=self.lr, betas=(0.9, 0.999),
                                    weight_decay=self.weight_decay)
        return torch.optim.SGD(self.params, lr=self.lr, momentum=self.sgd_momentum,
                               weight_decay=self.weight_decay)

    def _reset_optimizer(self) -> None:
        self.optimizer = self._make_optimizer()

    def hparams(self) -> dict:
        return {**super().hparams(), 'lr': self.lr, 'optimizer': self.optimizer_name}


def log_num_classes(num_classes: int) -> float:
    return math.log(max(2, num_classes))
