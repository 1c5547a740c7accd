"""The loss registry: what PartialFC computes per sample, by name (``loss.name`` in the config).

PartialFC (mlcd_train/partial_fc.py) reduces every sample to two log-sum-exps over the
sampled centres, across ranks: ``pos`` over its positives (of ``-s phi(cos_i)``; for a
``single_positive`` loss the one positive's ``s phi(cos_y)`` itself) and ``neg`` over the
sampled negatives (of ``s cos_j``).  A loss is the function ``per_sample(pos, neg)`` of the two,
plus whether it takes one positive (the first label column) or all of them.

Adding a loss is one function and one :func:`register_loss` call here (or in a module that
imports this one before the config is validated); ``loss.name``'s choices, PartialFC's check
and the config's ``loss.l`` rule come from this registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Loss:
    """One registered loss: ``per_sample(pos, neg) -> [N]`` (torch tensors), ``single_positive``:
    only ``labels[:, 0]`` is a positive (the other columns are ignored; the config then requires
    ``loss.l=1``), ``formula``: the loss in words (docs and ``--help``)."""

    name: str
    per_sample: Callable
    single_positive: bool
    formula: str


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, per_sample: Callable, *, single_positive: bool = False, formula: str = "") -> Loss:
    """Register (or replace) a loss under ``name``; returns its entry."""
    if not name or not name.isidentifier():
        raise ValueError(f"loss name {name!r}: use a Python identifier")
    LOSSES[name] = Loss(name, per_sample, single_positive, formula)
    return LOSSES[name]


def loss_names() -> tuple[str, ...]:
    """The registered names, in registration order (``loss.name``'s choices)."""
    return tuple(LOSSES)


def get_loss(name: str) -> Loss:
    """The registered loss ``name``; KeyError naming the choices otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"loss {name!r} is not one of {loss_names()}") from None


def softplus(x):
    """log(1 + exp(x)), exact (no threshold) and 0 with zero gradient at -inf."""
    import torch

    return torch.logaddexp(x, torch.zeros_like(x))


def _mlcd(pos, neg):
    return softplus(pos) + softplus(neg)


def _unicom(pos, neg):
    import torch

    return torch.logaddexp(pos, neg) - pos


def _mlc(pos, neg):
    return softplus(pos + neg)


register_loss("mlcd", _mlcd, formula="log(1 + sum_P exp(-s phi(cos_i))) + log(1 + sum_N' exp(s cos_j))")
register_loss("unicom", _unicom, single_positive=True,
              formula="-log(exp(s phi(cos_y)) / (exp(s phi(cos_y)) + sum_N' exp(s cos_j))), y = labels[:, 0]")
register_loss("mlc", _mlc, formula="log(1 + sum_N' exp(s cos_j) * sum_P exp(-s phi(cos_i)))")
