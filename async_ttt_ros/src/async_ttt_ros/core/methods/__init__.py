"""Test-time adaptation methods, one class each over AdaptationMethod (see base.py)."""
from __future__ import annotations

from .base import AdaptationMethod, softmax_entropy
from .eata import EATA
from .norm import Norm
from .safe import Safe
from .source import Source
from .tent import Tent

METHODS: dict[str, type[AdaptationMethod]] = {
    'source': Source,
    'norm': Norm,
    'tent': Tent,
    'eata': EATA,
    'safe': Safe,
}


def make_method(name: str, model, **hp) -> AdaptationMethod:
    """Instantiate method `name` on `model` (the adapter's own copy); unknown names are an error."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f'unknown adaptation method {name!r}; choose one of {sorted(METHODS)}') from None
    return cls(model, **hp)


__all__ = ['AdaptationMethod', 'METHODS', 'make_method', 'softmax_entropy',
           'Source', 'Norm', 'Tent', 'EATA', 'Safe']
