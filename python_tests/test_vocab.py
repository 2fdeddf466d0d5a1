"""pama_ext.vocab mirrors the C++ library's vocabularies and layouts (csrc/pama_math.h): the method
list, the statistics layout, and what the ops accept and reject follow from them."""
from __future__ import annotations

import pytest
import torch

import pama_ext
from pama_ext import ops, pareto, reference, vocab
from pama_testutils import COMBOS, require_native

F64 = torch.float64


def test_methods_match_the_library():
    require_native()
    assert tuple(torch.ops.pama_ext.weighting_methods()) == vocab.METHODS
    assert vocab.GRAM_METHODS == tuple(m for m in vocab.METHODS if m != "pama")
    assert pareto.METHODS is vocab.METHODS and reference.METHODS is vocab.METHODS


@pytest.mark.parametrize("n", list(range(1, 65)))
def test_stats_layout_matches_the_library(n):
    require_native()
    lay = vocab.stats_layout(n)
    offsets = list(torch.ops.pama_ext.stats_layout(n))
    names = [name for name, _ in vocab.STATS_FIELDS]
    assert offsets[:-1] == [lay[name].start for name in names]
    assert offsets[-1] == vocab.stats_size(n) == (n + 3) ** 2 - 7
    assert vocab.stats_num_objectives(vocab.stats_size(n)) == n


def test_stats_layout_bad_n():
    require_native()
    for n in (0, 65):
        with pytest.raises(ValueError, match="n must be in"):
            torch.ops.pama_ext.stats_layout(n)
    with pytest.raises(ValueError, match="stats"):
        vocab.stats_num_objectives(10)


def test_every_method_is_accepted_by_the_ops():
    """The statistics ops take every method; the Gram op every method but pama, and its error says why."""
    require_native()
    n = 3
    g = torch.randn(n, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    G = g @ g.T
    stats = torch.zeros(vocab.stats_size(n), dtype=F64)
    stats[vocab.stats_layout(n)["gram"]] = G.reshape(-1)
    stats[vocab.stats_layout(n)["abar"]] = torch.tensor([0.3, 0.1, 0.2], dtype=F64)
    for m in vocab.METHODS:
        w = ops.pareto_weights(stats, m, "batch")
        assert w.shape == (n,) and torch.isfinite(w).all(), m
        if m != "pama":
            torch.testing.assert_close(w, pareto.gram_weights(G, None, m))
    for m in vocab.GRAM_METHODS:
        assert torch.ops.pama_ext.gram_weights(G, None, m, 0.4).shape == (n,)
    with pytest.raises(ValueError, match="pama needs the per-token statistics"):
        torch.ops.pama_ext.gram_weights(G, None, "pama", 0.4)
    with pytest.raises(ValueError, match="method must be one of 'pama', 'linear', 'mgda', 'cagrad', 'raco', 'pcgrad'"):
        ops.pareto_weights(stats, "nash", "batch")


def test_policy_loss_grids_cover_every_method():
    assert {m for m, _ in COMBOS} == set(vocab.METHODS)
    assert {g for m, g in COMBOS if m == "pama"} == set(vocab.GRANULARITIES)


def test_cagrad_c_reaches_the_weights():
    """pama_policy_loss(method='cagrad' / 'raco', cagrad_c=c) uses c: the reported weights are the
    Gram op's on the statistics Gram with prefs as w, and c changes them."""
    require_native()
    gen = torch.Generator().manual_seed(3)
    n, B, T = 3, 4, 9
    adv = torch.randn(n, B, T, generator=gen, dtype=F64)
    adv[1] = -adv[0] + 0.3 * adv[1]  # conflicting objectives
    logp = torch.randn(B, T, generator=gen, dtype=F64) * 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    prefs = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    for m in ("cagrad", "raco"):
        seen = []
        for c in (0.2, 1.5):
            _, met = pama_ext.pama_policy_loss(logp, logp, adv, mask, method=m, prefs=prefs, cagrad_c=c)
            stats = pama_ext.objective_stats(adv, logp, logp, mask)
            G = stats[vocab.stats_layout(n)["gram"]].reshape(n, n)
            torch.testing.assert_close(met["weights"], pareto.gram_weights(G, prefs, m, c))
            seen.append(met["weights"])
        assert not torch.allclose(seen[0], seen[1]), m
    with pytest.raises(ValueError, match="cagrad_c"):
        pama_ext.pama_policy_loss(logp, logp, adv, mask, method="cagrad", cagrad_c=-1.0)


def test_policy_loss_options_are_one_list():
    """The module front end takes exactly pama_policy_loss's options, with its defaults, and the
    reference implementation has the same options with the same defaults."""
    import inspect

    from pama_ext.losses import policy_loss_options

    opts = policy_loss_options()
    assert {"method", "granularity", "agg", "noon", "whiten", "cagrad_c", "beta_loss"} <= set(opts)
    ref = {k: p.default for k, p in inspect.signature(reference.pama_policy_loss).parameters.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "prefs"}
    assert ref == opts
    assert pama_ext.PamaPolicyLoss().options == opts
    assert pama_ext.PamaPolicyLoss(cagrad_c=0.9).options["cagrad_c"] == 0.9
    with pytest.raises(TypeError, match="unknown option.*'granulatiry'"):
        pama_ext.PamaPolicyLoss(granulatiry="token")
