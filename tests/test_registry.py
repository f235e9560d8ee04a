"""The exchange registry: every ep_exchange maps to its class, and the fallbacks are
decided in one place, each announced once per process."""

from __future__ import annotations

import itertools
import warnings

import pytest

import epar
from epar.dispatch import EXCHANGES, resolve_exchange
from epar.parallel import groups


def test_registry_names_every_configurable_exchange():
    assert set(EXCHANGES) == set(epar.config.EP_EXCHANGES)
    assert epar.MoEConfig(d_model=8, d_ff=8, num_experts=4).ep_exchange == epar.config.DEFAULT_EP_EXCHANGE


def _expected(exchange, strategy, chunks, ep_size, topology):
    """The fallback rules, written out case by case."""
    if ep_size == 1:
        return "local"
    if exchange == "hierarchical" and (not topology or strategy != "dropless"):
        exchange = "dedup"
    if exchange == "dedup" and strategy != "dropless" and chunks > 1:
        return "regroup"
    return exchange


def test_fallbacks_are_decided_once_and_announced_once(monkeypatch):
    monkeypatch.setattr(groups, "_noticed", set())  # a fresh process's notices
    seen = []
    for exchange, strategy, chunks, ep_size, topology in itertools.product(
            epar.config.EP_EXCHANGES, epar.config.STRATEGIES, (1, 2), (1, 2, 4), (False, True)):
        cfg = epar.MoEConfig(d_model=8, d_ff=8, num_experts=4, strategy=strategy, overlap_chunks=chunks,
                             ep_exchange=exchange)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = resolve_exchange(cfg, ep_size, topology)
        assert got == _expected(exchange, strategy, chunks, ep_size, topology), (exchange, strategy, chunks)
        seen += [str(w.message) for w in caught]
    # four fallbacks (hierarchical: no topology / a capacity strategy; dedup: capacity with
    # chunks; allgather: chunks), each said once, naming the exchange it runs as
    assert len(seen) == 4 and len(set(seen)) == 4, seen
    assert sum("runs as 'dedup'" in m for m in seen) == 2 and sum("runs as 'regroup'" in m for m in seen) == 1
    assert any("allgather" in m and "overlap_chunks is ignored" in m for m in seen)


@pytest.mark.parametrize("name", sorted(EXCHANGES))
def test_every_exchange_is_one_class_in_its_own_module(name):
    cls = EXCHANGES[name]
    assert issubclass(cls, epar.dispatch.TokenExchange)
    assert cls.__module__.startswith("epar.dispatch.")
