"""ReputationGate: decide whether a candidate head may replace the served one.

No labels exist at test time, so the gate compares candidate and served model on the memory's
held-out latents (never trained on) with unsupervised signals, both in eval mode (how the
candidate would actually be served):

- mean entropy H (confidence), normalised by ln C;
- diversity D = entropy of the mean prediction / ln C (1 = predictions spread over all classes,
  0 = every sample gets the same class), and the number of distinct predicted classes;
- agreement = share of held-out samples where candidate and served predict the same class.

Score = information-maximisation gain (SHOT's objective, Liang et al. 2020): (D - H)_candidate -
(D - H)_served. It rewards becoming more confident only while predictions stay diverse, which is
exactly what distinguishes adaptation from the degenerate "confident on one class" solution.

Decision, in order:
- reset:    collapse — candidate diversity fell below `collapse_diversity` (absolute) and below
            `collapse_ratio` x served diversity, or it predicts a single class where the served
            model predicts several; also when the candidate has non-finite outputs;
- rollback: clearly worse — score < -rollback_margin, or agreement < min_agreement while the
            score does not show a clear gain (>= convincing_gain);
- accept:   score >= -tolerance (better, or not worse within tolerance);
- hold:     otherwise (not convincing yet: keep training, send nothing).
A held-out slice smaller than `min_holdout` gives 'hold'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .methods.base import softmax_entropy

DECISION_KINDS = ('accept', 'hold', 'rollback', 'reset')


@dataclass
class Decision:
    kind: str
    reason: str
    score: float
    metrics: dict = field(default_factory=dict)


def _summary(logits: Tensor) -> dict:
    c = logits.shape[1]
    log_c = math.log(c)
    probs = logits.softmax(1)
    mean = probs.mean(0)
    pred = probs.argmax(1)
    return {
        'entropy': float(softmax_entropy(logits).mean()) / log_c,
        'diversity': float(-(mean * mean.clamp_min(1e-12).log()).sum()) / log_c,
        'classes': int(torch.unique(pred).numel()),
        'confidence': float(probs.max(1).values.mean()),
        'pred': pred,
    }


class ReputationGate:
    """Scores candidate vs served on held-out latents; every decision is counted in `counts`.

    Defaults (tuned on fmnist_cnn / Fashion-MNIST-C, documented in the module docstring):
    tolerance 0.01, rollback_margin 0.05, min_agreement 0.5, convincing_gain 0.05,
    collapse_diversity 0.35, collapse_ratio 0.6, min_holdout 32, max_eval 512 latents.
    """

    def __init__(self, tolerance: float = 0.01, rollback_margin: float = 0.05,
                 min_agreement: float = 0.5, convincing_gain: float = 0.05,
                 collapse_diversity: float = 0.35, collapse_ratio: float = 0.6,
                 min_holdout: int = 32, max_eval: int = 512):
        if rollback_margin < tolerance:
            raise ValueError('rollback_margin must be >= tolerance')
        self.tolerance = float(tolerance)
        self.rollback_margin = float(rollback_margin)
        self.min_agreement = float(min_agreement)
        self.convincing_gain = float(convincing_gain)
        self.collapse_diversity = float(collapse_diversity)
        self.collapse_ratio = float(collapse_ratio)
        self.min_holdout = int(min_holdout)
        self.max_eval = int(max_eval)
        self.counts = {k: 0 for k in DECISION_KINDS}
        self.last: Decision | None = None

    def _decide(self, kind: str, reason: str, score: float, metrics: dict) -> Decision:
        self.counts[kind] += 1
        self.last = Decision(kind, reason, float(score), metrics)
        return self.last

    @torch.no_grad()
    def evaluate(self, candidate, served, holdout: Tensor) -> Decision:
        n = 0 if holdout is None else int(holdout.shape[0])
        if n < self.min_holdout:
            return self._decide('hold', f'only {n} held-out latents (need {self.min_holdout})', 0.0, {'n': n})
        z = holdout[-self.max_eval:]
        was_c, was_s = candidate.training, served.training
        candidate.eval()
        served.eval()
        try:
            lc = candidate.classify(z)
            ls = served.classify(z)
        finally:
            candidate.train(was_c)
            served.train(was_s)
        if not torch.isfinite(lc).all():
            return self._decide('reset', 'collapse: candidate produces non-finite logits', -math.inf, {'n': n})
        c, s = _summary(lc), _summary(ls)
        agreement = float((c['pred'] == s['pred']).float().mean())
        score = (c['diversity'] - c['entropy']) - (s['diversity'] - s['entropy'])
        metrics = {'n': int(z.shape[0]), 'agreement': agreement, 'score': score,
                   **{f'candidate_{k}': v for k, v in c.items() if k != 'pred'},
                   **{f'served_{k}': v for k, v in s.items() if k != 'pred'}}
        desc = (f"score {score:+.3f} (H {c['entropy']:.3f} vs {s['entropy']:.3f}, D {c['diversity']:.3f} vs "
                f"{s['diversity']:.3f}, agreement {agreement:.2f}, classes {c['classes']} vs {s['classes']})")
        if c['diversity'] < self.collapse_diversity and c['diversity'] < self.collapse_ratio * s['diversity']:
            return self._decide('reset', f'collapse: diversity fell; {desc}', score, metrics)
        if c['classes'] == 1 and s['classes'] > 1:
            return self._decide('reset', f'collapse: candidate predicts a single class; {desc}', score, metrics)
        if score < -self.rollback_margin:
            return self._decide('rollback', f'candidate clearly worse: {desc}', score, metrics)
        if agreement < self.min_agreement and score < self.convincing_gain:
            return self._decide('rollback', f'candidate disagrees with served model without a clear gain: {desc}',
                                score, metrics)
        if score >= -self.tolerance:
            return self._decide('accept', f'not worse within tolerance {self.tolerance}: {desc}', score, metrics)
        return self._decide('hold', f'not convincing yet: {desc}', score, metrics)
