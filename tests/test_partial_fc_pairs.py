"""The positives' pair cosines of PartialFC's logits kernel (the dense [N, l] label slots, computed
in sample blocks): blocks sized by l * d against ``max_chunk_elems`` / 4, the gradient of slots
without a positive on this rank spread over rows instead of piled on one, and results
bit-identical (float64) to the kernel as it was before both changes."""
from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F

from mlcd_train import partial_fc as P

EPS = 1e-12


def _old_pairs(e_n, weight, index, pos_cols, g_pos, max_chunk_elems):
    """A copy of the kernel's positive-pair part before the change: blocks of chunk // l samples
    (chunk = the column chunk, max_chunk_elems // max(N, d)), every slot without a positive sent
    to one row in index_add_.  Returns cos_pos, d/d e_n, d/d weight for the upstream g_pos."""
    n, l, d = e_n.shape[0], pos_cols.shape[1], weight.shape[1]
    chunk = max(1, max_chunk_elems // max(n, d))
    b = max(1, chunk // max(1, l))
    valid = pos_cols >= 0
    col = pos_cols.clamp(min=0)
    rows = col if index is None else index[col]
    cos_pos = torch.zeros(pos_cols.shape, dtype=e_n.dtype)
    grad_e, grad_w = torch.zeros_like(e_n), torch.zeros_like(weight)
    g = torch.where(valid, g_pos, torch.zeros_like(g_pos))
    for s0 in range(0, n, b):
        s1 = min(n, s0 + b)
        ed = e_n[s0:s1].clone().requires_grad_()
        wp = weight[rows[s0:s1]].to(e_n.dtype).requires_grad_()
        c = (F.normalize(wp, dim=2, eps=EPS) * ed.unsqueeze(1)).sum(2)
        cos_pos[s0:s1] = torch.where(valid[s0:s1], c.detach(), torch.zeros_like(c))
        ge, gwp = torch.autograd.grad(c, (ed, wp), g[s0:s1])
        grad_e[s0:s1] += ge
        grad_w.index_add_(0, rows[s0:s1].reshape(-1), gwp.reshape(-1, d).to(grad_w.dtype))
    return cos_pos, grad_e, grad_w


def _inputs(seed, n, k, d, l, absent):
    """Normalised embeddings, centres and [n, l] slots of which a share ``absent`` hold no
    positive here (-1: padding or another rank's class); index: None or a sorted half."""
    g = torch.Generator().manual_seed(seed)
    e_n = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, k, (n, l), generator=g)
    pos[torch.rand(n, l, generator=g) < absent] = -1
    return g, e_n, weight, pos


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("absent", [0.3, 0.9])
@pytest.mark.parametrize("max_elems", [64, 600, 2000, 1 << 21])
def test_pair_cosines_and_gradients_are_bitwise_the_old_kernels(sampled, absent, max_elems):
    n, k, d, l = 37, 50, 8, 5
    g, e_n, weight, pos = _inputs(1, n, k, d, l, absent)
    index = None
    if sampled:  # a sorted half of the rows; pos then holds columns of that index
        index = torch.randperm(k, generator=g)[:k // 2].sort().values
        pos = torch.where(pos >= 0, pos % index.numel(), pos)
    g_pos = torch.randn(n, l, generator=g, dtype=torch.float64)
    want_cos, want_ge, want_gw = _old_pairs(e_n, weight, index, pos, g_pos, max_elems)

    e = e_n.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    chunk = max(1, max_elems // max(n, d))
    lse, cos_pos = P._SampledLogSumExp.apply(e, w, index, pos, 64.0, chunk, max_elems)
    # only the cosines carry a gradient: the columns' part of backward adds exact zeros
    (cos_pos * g_pos).sum().backward()
    assert torch.equal(cos_pos, want_cos)
    assert torch.equal(e.grad, want_ge)
    assert torch.equal(w.grad, want_gw)


def _record_blocks(monkeypatch) -> list:
    sizes = []
    original = P._SampledLogSumExp._cos_pairs

    def spy(e_rows, w_rows):
        sizes.append(tuple(w_rows.shape))
        return original(e_rows, w_rows)
    monkeypatch.setattr(P._SampledLogSumExp, "_cos_pairs", staticmethod(spy))
    return sizes


@pytest.mark.parametrize("n,l,d,max_elems",
                         [(64, 4, 8, 1024), (300, 8, 16, 16384), (16, 4, 32, 2048), (40, 8, 16, 400)])
def test_pair_blocks_fill_a_quarter_of_max_chunk_elems_and_never_exceed_it(monkeypatch, n, l, d, max_elems):
    """Each block's [b, l, d] gather holds at most max_chunk_elems / 4 elements (its backward
    holds ~6.5 such tensors; one sample when l * d alone is more) and as many samples as fit:
    ceil(N / (max_chunk_elems // (4 l d))) blocks each in forward and backward.  (The old sizing,
    chunk // l samples with chunk = max_chunk_elems // max(N, d), bounded each block by
    max_chunk_elems, not a quarter, when N <= d (the third case: one block of 2048 elements,
    whose backward then peaked at ~8 x max_chunk_elems), and made max(N, d) / d times more, smaller
    blocks when N > d: 16 instead of 8 at the first case.)"""
    sizes = _record_blocks(monkeypatch)
    g = torch.Generator().manual_seed(0)
    k = 40
    pfc = P.PartialFC(d, k, sample_rate=1.0, max_chunk_elems=max_elems)
    emb = torch.randn(n, d, generator=g).requires_grad_()
    labels = torch.randint(0, k, (n, l), generator=g)
    labels[torch.rand(n, l, generator=g) < 0.3] = -1
    pfc(emb, labels).backward()
    per_block = max(1, max_elems // (4 * l * d))
    blocks = math.ceil(n / per_block)
    assert max(b * ll * dd for b, ll, dd in sizes) <= max(max_elems // 4, l * d)
    assert len(sizes) == 2 * blocks  # forward, then backward
    assert max(b for b, _, _ in sizes) == min(n, per_block)


def test_slots_without_a_positive_spread_their_index_add_over_rows(monkeypatch):
    """The [N, l] slots without a positive on this rank (here 90 %) add their (zero) gradient to
    distinct rows, at most ceil(slots / rows) per row, not all to one row."""
    targets = []
    original = torch.Tensor.index_add_

    def spy(self, dim, index, source, **kw):
        targets.append(index.clone())
        return original(self, dim, index, source, **kw)
    monkeypatch.setattr(torch.Tensor, "index_add_", spy)
    n, k, d, l = 40, 50, 8, 5
    _, e_n, weight, pos = _inputs(2, n, k, d, l, absent=0.9)
    e, w = e_n.clone().requires_grad_(), weight.clone().requires_grad_()
    _, cos_pos = P._SampledLogSumExp.apply(e, w, None, pos, 64.0, 4, 1 << 20)
    cos_pos.sum().backward()
    rows = torch.cat(targets)  # the blocks' targets, in slot order
    absent_rows = rows[(pos < 0).reshape(-1)]
    assert absent_rows.numel() > 150
    most = max(collections.Counter(absent_rows.tolist()).values())
    assert most <= math.ceil(n * l / k)
    valid = pos >= 0
    assert torch.equal(rows.view(n, l)[valid], pos[valid])


@pytest.mark.parametrize("sampled", [False, True])
def test_the_kernel_does_not_depend_on_the_pair_block_size(sampled):
    """float64, 60 % of the slots without a positive, both outputs carrying a gradient: one
    block, one sample per block or blocks of 3, the same bits (only the column chunk, fixed
    here, changes how the negatives' sum is rounded)."""
    n, k, d, l = 24, 30, 8, 4
    g, e_n, weight, pos = _inputs(3, n, k, d, l, absent=0.6)
    index = None
    if sampled:
        index = torch.randperm(k, generator=g)[:20].sort().values
        pos = torch.where(pos >= 0, pos % 20, pos)
    g_lse, g_pos = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, l, generator=g,
                                                                                   dtype=torch.float64)
    out = []
    for max_elems in (1 << 20, l * d, 4 * 3 * l * d + 1):
        e, w = e_n.clone().requires_grad_(), weight.clone().requires_grad_()
        lse, cos_pos = P._SampledLogSumExp.apply(e, w, index, pos, 16.0, 7, max_elems)
        ((lse * g_lse).sum() + (cos_pos * g_pos).sum()).backward()
        out.append((lse.detach(), cos_pos.detach(), e.grad, w.grad))
    for other in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0], other))
