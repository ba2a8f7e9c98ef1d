"""Weight strategies (surgeon/methods/matrices.py): splits, expert draws, merge formulas, pruning."""
from __future__ import annotations

import pytest
import torch

from surgeon.methods.base import ExpertSampler, PatchContext
from surgeon.recipe import rule as typed_rule
from surgeon.methods.matrices import (DenseMatrix, ExpertSplitMatrix, PrunedMatrix, apply_linear, kaiming_uniform,
                                      make_matrix, random_keep_mask, random_quantile_index)


def ctx_for(modifiers: dict, seed: int = 0) -> PatchContext:
    """A patch context for an adapter rule with these modifiers (``experts``/``prune``; schema defaults filled)."""
    gen = torch.Generator().manual_seed(seed + 1)
    rule = typed_rule({"target": "m", "adapter": {}, **modifiers})
    return PatchContext(rule=rule, rule_index=0, layer_index=0, num_layers=1, sampler=ExpertSampler(seed=seed),
                        init_generator=gen)


def split_matrix(n=4, shape=(24, 16), granularity="all", bias="split", seed=0, perturb=True) -> ExpertSplitMatrix:
    ctx = ctx_for({"experts": {"count": n, "granularity": granularity, "sparse": ["up"], "bias": bias}}, seed)
    m = make_matrix(kaiming_uniform(*shape, ctx.init_generator), "up", ctx.rule, ctx, init_bias=torch.randn(shape[0]))
    assert isinstance(m, ExpertSplitMatrix)
    if perturb:
        torch.manual_seed(seed)
        with torch.no_grad():
            m.delta.normal_()
            if bias == "split":
                m.bias_delta.normal_()
    return m


# ----------------------------------------------------------------------------- splits

@pytest.mark.parametrize("granularity", ["all", "row", "column"])
@pytest.mark.parametrize("n", [2, 4, 5])
def test_masks_disjoint_covering_balanced(granularity, n):
    shape = (12, 20)
    index = random_quantile_index(shape, n, granularity, torch.Generator().manual_seed(3)).long()
    assert index.dtype == torch.long and index.min() >= 0 and index.max() < n
    masks = torch.stack([index == i for i in range(n)])
    assert (masks.sum(0) == 1).all()                      # disjoint and covering
    sizes = masks.flatten(1).sum(1).float()
    assert (sizes - index.numel() / n).abs().max() <= {"all": 1, "row": shape[0], "column": shape[1]}[granularity]
    if granularity != "all":                              # balanced within every row / column
        dim = 1 if granularity == "row" else 0
        per = masks.sum(dim + 1).float()                  # [n, rows or columns]
        assert (per - shape[dim] / n).abs().max() < 1


def test_row_and_all_granularities_differ_in_structure():
    g = torch.Generator().manual_seed(0)
    rows = random_quantile_index((8, 40), 4, "row", g).long()
    assert all(torch.bincount(r, minlength=4).tolist() == [10] * 4 for r in rows)
    cols = random_quantile_index((40, 8), 4, "column", g).long()
    assert all(torch.bincount(c, minlength=4).tolist() == [10] * 4 for c in cols.T)


def test_masks_reproducible_from_seed():
    a = split_matrix(seed=5, perturb=False)
    b = split_matrix(seed=5, perturb=False)
    c = split_matrix(seed=6, perturb=False)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.weight0, b.weight0)
    assert not torch.equal(a.expert_index, c.expert_index)
    assert a.expert_index.dtype == torch.uint8


def test_memory_independent_of_expert_count():
    sizes = []
    for n in (2, 8, 64):
        m = split_matrix(n=n, perturb=False)
        sizes.append(sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())))
    assert len(set(sizes)) == 1


# ----------------------------------------------------------------------------- experts and merges

def test_expert_weight_is_w0_plus_masked_delta():
    m = split_matrix()
    for i in range(4):
        expected = m.weight0 + m.delta * (m.expert_index == i)
        assert torch.equal(m.expert_weight(i), expected)
    # Different experts differ exactly on their own entries.
    assert not torch.equal(m.expert_weight(0), m.expert_weight(1))


@pytest.mark.parametrize("bias", ["split", "dense"])
def test_merge_formulas(bias):
    m = split_matrix(bias=bias)
    w_avg, b_avg = m.merged("average")
    w_jig, b_jig = m.merged("jigsaw")
    assert torch.allclose(w_avg, m.weight0 + m.delta / 4, atol=0)
    assert torch.allclose(w_jig, m.weight0 + m.delta, atol=0)
    # average = the mean of the N experts' effective weights; jigsaw = each entry from its own expert.
    experts = torch.stack([m.expert_weight(i) for i in range(4)])
    assert torch.allclose(w_avg, experts.mean(0), atol=1e-6)
    jigsaw = torch.zeros_like(w_jig)
    for i in range(4):
        jigsaw[m.expert_index == i] = experts[i][m.expert_index == i]
    assert torch.equal(w_jig, jigsaw)
    if bias == "split":
        assert torch.allclose(b_avg, m.bias0 + m.bias_delta / 4) and torch.allclose(b_jig, m.bias0 + m.bias_delta)
    else:
        assert torch.equal(b_avg, m.bias) and torch.equal(b_jig, m.bias)
    with pytest.raises(ValueError):
        m.merged("sum")


def test_merge_in_fp32_from_bf16():
    m = split_matrix().to(torch.bfloat16)
    assert m.delta.dtype == torch.bfloat16 and m.expert_index.dtype == torch.uint8
    w, _ = m.merged("average")
    assert w.dtype == torch.float32
    assert torch.equal(w, m.weight0.float() + m.delta.float() / 4)


def test_draws_reproducible_and_uniform():
    m = split_matrix(n=4)
    m.train()
    replay = ExpertSampler(seed=0)  # the same seed the matrix's sampler got
    counts = torch.zeros(4)
    for _ in range(2000):
        w, _ = m.effective()
        k = int(replay.randint(4))
        assert torch.equal(w, m.expert_weight(k))  # the draw is the sampler's, in order
        counts[k] += 1
    # Uniform: each of 4 experts about 500 of 2000 (binomial sd ~19; 5 sd bounds).
    assert (counts - 500).abs().max() < 100, counts


def test_train_forward_is_stochastic_and_eval_modes():
    m = split_matrix()
    x = torch.randn(3, 16)
    m.train()
    outs = [m(x) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    m.eval()
    s = m.sampler
    w_avg, b_avg = m.merged("average")
    assert torch.allclose(m(x), apply_linear(x, w_avg, b_avg), atol=1e-6)          # merge (default)
    s.merge_mode = "jigsaw"
    w_jig, b_jig = m.merged("jigsaw")
    assert torch.allclose(m(x), apply_linear(x, w_jig, b_jig), atol=1e-6)
    s.mode, s.expert = "fixed", 2
    assert torch.equal(m.effective()[0], m.expert_weight(2)) and torch.equal(m(x), m(x))
    s.mode = "stochastic"
    assert any(not torch.equal(m(x), m(x)) for _ in range(8))
    s.mode, s.expert = "fixed", 4
    with pytest.raises(ValueError):
        m(x)


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
def test_groups_apply_expert_g_to_batch_slice_g(layout):
    m = split_matrix()
    m.train()
    m.sampler.groups = 2
    replay = ExpertSampler(seed=0)
    x = torch.randn(4, 5, 16) if layout == "tokens" else torch.randn(4, 16, 3, 2)
    channel_dim = -1 if layout == "tokens" else 1
    y = m(x, channel_dim=channel_dim)
    k = replay.randint(4, 2).tolist()
    for g in range(2):
        i = m.expert_index
        w = m.weight0 + m.delta * (i == k[g])
        b = m.bias0 + m.bias_delta * (m.bias_index == k[g])
        assert torch.allclose(y[2 * g:2 * g + 2], apply_linear(x[2 * g:2 * g + 2], w, b, channel_dim), atol=1e-5)
    with pytest.raises(ValueError):
        m(torch.randn(3, 16))  # 3 samples cannot form 2 groups


def test_apply_linear_nchw_equals_channels_last():
    w, b = torch.randn(6, 4), torch.randn(6)
    x = torch.randn(2, 4, 3, 5)
    expected = apply_linear(x.permute(0, 2, 3, 1), w, b).permute(0, 3, 1, 2)
    assert torch.allclose(apply_linear(x, w, b, channel_dim=1), expected, atol=1e-5)


def test_gradient_reaches_only_the_drawn_expert_entries():
    m = split_matrix(perturb=False)
    m.train()
    replay = ExpertSampler(seed=0)
    m(torch.randn(3, 16)).sum().backward()
    k = int(replay.randint(4))
    grad = m.delta.grad
    assert (grad[m.expert_index != k] == 0).all() and (grad[m.expert_index == k] != 0).any()


# ----------------------------------------------------------------------------- pruning

def test_random_keep_mask_fraction():
    mask = random_keep_mask((64, 32), 0.25, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 512


@pytest.mark.parametrize("bias", ["pruned", "dense"])
def test_pruned_entries_stay_zero_under_adamw_with_weight_decay(bias):
    ctx = ctx_for({"prune": {"keep": 0.25, "matrices": ["down", "up"], "bias": bias}})
    m = make_matrix(kaiming_uniform(32, 16, ctx.init_generator), "down", ctx.rule, ctx, init_bias=torch.randn(32))
    assert isinstance(m, PrunedMatrix)
    assert m.extra_params() == 128 + (8 if bias == "pruned" else 32)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.5)
    before = m.weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        (m(torch.randn(8, 16)) ** 2).sum().backward()
        opt.step()
    pruned = ~m.mask
    assert (m.weight[pruned] == 0).all() and (m.effective()[0][pruned] == 0).all()
    assert not torch.equal(m.weight[m.mask], before[m.mask])  # the kept entries did train
    if bias == "pruned":
        assert (m.bias[~m.bias_mask] == 0).all()
    w, _ = m.merged()
    assert (w[pruned] == 0).all() and torch.equal(w[m.mask], m.weight[m.mask])


# ----------------------------------------------------------------------------- factory and counts

def test_factory_picks_strategy_per_role_and_counts():
    w = torch.zeros(8, 4)
    hier = ctx_for({"experts": {"count": 4, "sparse": ["up"]}})
    assert isinstance(make_matrix(w, "down", hier.rule, hier), DenseMatrix)
    up = make_matrix(w, "up", hier.rule, hier, init_bias=torch.zeros(8))
    assert isinstance(up, ExpertSplitMatrix) and up.extra_params() == 8 * 4 + 8  # dense size, counted once
    flat = ctx_for({"experts": {"count": 4, "sparse": ["down", "up"]}})
    assert isinstance(make_matrix(w, "down", flat.rule, flat), ExpertSplitMatrix)
    none = ctx_for({"experts": {"count": 4, "sparse": []}})
    assert isinstance(make_matrix(w, "up", none.rule, none), DenseMatrix)
    only_up = ctx_for({"prune": {"keep": 0.5, "matrices": ["up"]}})
    assert isinstance(make_matrix(w, "down", only_up.rule, only_up), DenseMatrix)
    assert make_matrix(w, "up", only_up.rule, only_up).extra_params() == 16
    assert make_matrix(w, "up", ctx_for({}).rule, ctx_for({})).extra_params() == 32
    both = ctx_for({"experts": {"count": 4}, "prune": {"keep": 0.5}})
    with pytest.raises(ValueError, match="not both"):
        make_matrix(w, "up", both.rule, both)
    with pytest.raises(ValueError):
        make_matrix(w, "middle", ctx_for({}).rule, ctx_for({}))
