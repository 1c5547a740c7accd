"""PartialFC's input check switched off between log steps (``pfc.check_inputs``): no host read
in the forward, the same loss and gradients, bad labels of unchecked calls reported by the next
checking call (on every rank alike), and the trainer checking only on its first step and sync
points."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mlcd_train import partial_fc as P
from mlcd_train import train
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import run_distributed

READS = ("item", "tolist", "__bool__", "__float__", "__int__")
K, D = 11, 8


def _forbid_host_reads(monkeypatch):
    """Every host read of a tensor (item, tolist, bool / float / int) raises."""
    def boom(self, *a, _n=None):
        raise AssertionError("host read in an unchecked forward")
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, boom)


def _pfc(rate=1.0, loss="mlcd", rank=None, world=None):
    torch.manual_seed(0)
    pfc = P.PartialFC(D, K, sample_rate=rate, scale=16.0, margin=0.2, loss=loss, seed=0, rank=rank,
                      world_size=world)
    return pfc


def _data(seed=0, n=6, l=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, generator=g)
    labels = torch.randint(0, K, (n, l), generator=g)
    labels[1, 1:] = -1
    return emb, labels


def _loss_and_grads(pfc, emb, labels, gen_seed=5):
    pfc.generator.manual_seed(gen_seed)
    e = emb.clone().requires_grad_()
    pfc.weight.grad = None
    loss = pfc(e, labels)
    loss.backward()
    out = (loss.detach().clone(), e.grad.clone(), pfc.weight.grad.clone())
    pfc.take_sampled()
    return out


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_unchecked_forward_reads_nothing_and_equals_the_checked_one(rate, monkeypatch):
    pfc = _pfc(rate)
    emb, labels = _data()
    checked = _loss_and_grads(pfc, emb, labels)          # the first call is checked (and sets the structure)
    pfc.check_inputs = False
    emb2, labels2 = _data(seed=1)
    ref = _loss_and_grads(pfc, emb2, labels2)            # another batch, unchecked
    pfc.check_inputs = True
    again = _loss_and_grads(pfc, emb2, labels2)          # the same batch, checked
    for a, b in zip(ref, again):
        assert torch.equal(a, b)
    pfc.check_inputs = False
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        got = _loss_and_grads(pfc, emb2, labels2)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert not torch.equal(checked[0], ref[0])  # the batches differ: the comparison can fail


@pytest.mark.parametrize("loss", ["mlcd", "mlc", "unicom"])
def test_at_rate_1_an_unchecked_forward_and_backward_have_no_data_dependent_shape(loss):
    """Under FakeTensorMode (shapes without data, as a GPU's host sees them) an op whose output
    size depends on the data (nonzero, boolean indexing, unique: a host sync on CUDA) or a host
    read raises.  At sample_rate 1 an unchecked forward and backward have none; at 0.5 the
    sampling's selection of the positives is one (documented, kept)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

    for rate in (1.0, 0.5):
        pfc = _pfc(rate, loss=loss)
        emb, labels = _data()
        pfc(emb, labels)  # the checked first call
        pfc.check_inputs = False
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            e, y = mode.from_tensor(emb).requires_grad_(), mode.from_tensor(labels)
            if rate == 1.0:
                pfc(e, y).backward()
                assert e.grad is not None and e.grad.shape == emb.shape
            else:
                with pytest.raises((DynamicOutputShapeException, DataDependentOutputException)):
                    pfc(e, y)


def test_a_checking_plan_then_unchecked_plans_and_forwards_read_nothing(monkeypatch):
    """Gradient accumulation: plan() is checked on its own signature; afterwards a plan and its
    micro-batch forwards (and the optimiser's step) read nothing on the host."""
    pfc = _pfc(1.0)
    opt = pfc.make_optimizer(1e-2)
    emb, labels = _data(n=8)

    def step():
        pfc.plan(labels)
        for i in (0, 4):
            (pfc(emb[i:i + 4].clone().requires_grad_(), labels[i:i + 4]) / 2).backward()
        opt.step()
        opt.zero_grad()
    step()  # checked: the first plan and forward
    w = pfc.weight.detach().clone()
    pfc.check_inputs = False
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        step()
    assert not torch.equal(w, pfc.weight)  # it trained


def test_out_of_range_labels_in_unchecked_steps_are_harmless_and_reported_at_the_next_check():
    pfc = _pfc(0.5)
    emb, labels = _data()
    pfc.step_tag = 1
    pfc(emb, labels)                                      # checked
    pfc.check_inputs = False
    bad = labels.clone()
    bad[0, 0], bad[2, 1] = K, -7                          # outside [0, K) on both sides
    padded = labels.clone()
    padded[0, 0], padded[2, 1] = -1, -1
    pfc.step_tag = 3
    got = _loss_and_grads(pfc, emb, bad)
    # harmless: outside every rank's class range, the bad labels count as padding
    want = _loss_and_grads(pfc, emb, padded)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    pfc.step_tag = 4
    pfc(emb, labels)                                      # unchecked and good: not reported
    pfc.check_inputs, pfc.step_tag = True, 5
    with pytest.raises(MLCDError) as exc:
        pfc(emb, labels)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"unchecked steps 3..3 (found at step 5): rank 0: 1 call(s) with labels outside [0, num_classes={K})" in msg
    assert "min -7 max 11" in msg
    pfc(emb, labels)  # the record was read: the next check passes


def test_unicom_padding_in_the_first_column_of_an_unchecked_call_is_reported():
    pfc = _pfc(1.0, loss="unicom")
    emb, labels = _data()
    pfc(emb, labels)
    pfc.check_inputs = False
    bad = labels.clone()
    bad[3, 0] = -1
    pfc(emb, bad)
    pfc(emb, labels)
    pfc.check_inputs = True
    with pytest.raises(MLCDError, match=r"unchecked calls 2\.\.2 \(found at call 4\): rank 0: 1 call\(s\) with -1 "
                                        r"padding in labels\[:, 0\], which loss='unicom' needs a class in"):
        pfc(emb, labels)


def test_an_unchecked_call_whose_structure_changed_is_refused():
    pfc = _pfc(1.0)
    emb, labels = _data()
    pfc.check_inputs = False
    pfc(emb, labels)  # never checked: checked anyway
    with pytest.raises(MLCDError, match=r"the forward inputs changed structure since the last validated call"):
        pfc(emb[:4], labels[:4])
    with pytest.raises(MLCDError, match=r"changed structure"):
        pfc(emb, labels.int())
    pfc.check_inputs = True
    pfc(emb[:4], labels[:4])  # a checked call accepts it
    pfc.check_inputs = False
    pfc(emb[:4], labels[:4])


def _two_ranks(rank, world):
    pfc = _pfc(0.5, rank=rank, world=world)
    emb, labels = _data(n=6)
    mine = slice(3 * rank, 3 * rank + 3)
    pfc.step_tag = 1
    checked = _loss_and_grads(pfc, emb[mine], labels[mine])
    pfc.check_inputs = False
    unchecked = _loss_and_grads(pfc, emb[mine], labels[mine])
    same = all(torch.equal(a, b) for a, b in zip(checked, unchecked))
    bad = labels[mine].clone()
    if rank == 1:
        bad[0, 0] = 10 ** 9
    pfc.step_tag = 7
    pfc(emb[mine], bad)
    pfc.check_inputs, pfc.step_tag = True, 9
    try:
        pfc(emb[mine], labels[mine])
    except MLCDError as exc:
        return same, str(exc)
    return same, None


@pytest.mark.slow  # two spawned gloo ranks: 6 s of CPU on 2 cores
@pytest.mark.timeout(300)
def test_two_ranks_unchecked_equals_checked_and_every_rank_raises_the_same_error():
    res = run_distributed(_two_ranks, 2, (), timeout=240)
    assert [r[0] for r in res] == [True, True]
    msgs = [r[1] for r in res]
    assert msgs[0] is not None and msgs[0] == msgs[1]
    assert "unchecked steps 7..7 (found at step 9): rank 1: 1 call(s) with labels outside" in msgs[0]
    assert "max 1000000000" in msgs[0] and "rank 0" not in msgs[0]


# --------------------------------------------------------------------------- the trainer

def _count_pfc_reads(monkeypatch) -> list:
    """Host reads made by partial_fc.py."""
    reads = []
    where = str(Path(P.__file__))
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name):
            if sys._getframe(1).f_code.co_filename == where:
                reads.append((_name, sys._getframe(1).f_code.co_name))
            return _real(self, *a)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


def _cfg(out, n, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", "loss.sample_rate=1.0",
            "model.name=ViT-Tiny-4-28", "model.overrides={width: 16, layers: 1, heads: 2, output_dim: 8}",
            "train.global_batch_size=4", "optim.warmup_steps=0", f"train.steps={n}", f"train.log_every={n}",
            f"train.stop_check_every={n}", f"train.save_every={n}", *extra]


@pytest.mark.slow
def test_the_trainer_checks_labels_on_its_first_step_and_sync_points_only(tmp_path, monkeypatch):
    """4 and 12 steps with one sync point (the last): Partial FC makes the same host reads
    (its checks on step 1 and on the last step); with accumulation too."""
    reads = _count_pfc_reads(monkeypatch)
    for extra in ([], ["train.accum_steps=2"]):
        counts = []
        for n in (4, 12):
            reads.clear()
            assert train.main(_cfg(tmp_path / f"r{n}{len(extra)}", n, *extra)) == 0
            counts.append(len(reads))
        assert counts[0] == counts[1] > 0, reads


@pytest.mark.slow
def test_a_bad_label_between_sync_points_stops_the_trainer_at_the_next_one(tmp_path, monkeypatch):
    """A label past num_classes injected into step 3's batch (no check there) is reported by the
    check of step 4 (the sync point), naming step 3."""
    real = P.PartialFC.forward

    def forward(self, emb, labels):
        if self.step_tag == 3:
            labels = labels.clone()
            labels[0, 0] = 99
        return real(self, emb, labels)
    monkeypatch.setattr(P.PartialFC, "forward", forward)
    with pytest.raises(MLCDError, match=r"unchecked steps 3\.\.3 \(found at step 4\): rank 0: 1 call\(s\) with labels "
                                        r"outside \[0, num_classes=32\) \(-1 = padding\), min \d+ max 99"):
        train.main(_cfg(tmp_path / "bad", 8, "train.log_every=4", "train.stop_check_every=4"))


def test_below_rate_1_a_sample_that_holds_every_possible_positive_is_drawn_without_a_host_sync():
    """sample_rate < 1 with at most num_sample label slots in the gathered batch: the positives
    always fit, so the draw has a fixed size and no data-dependent op (FakeTensorMode raises on
    one); it picks the same rows and leaves the generator where the torch.unique branch does
    (the same labels padded with -1 columns take that branch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    k = 64
    pfc = P.PartialFC(D, k, sample_rate=0.5, scale=16.0, margin=0.2, seed=0)
    assert pfc.num_sample == 32
    g = torch.Generator().manual_seed(3)
    for n, l in ((4, 3), (8, 4), (2, 1)):          # 12, 32, 2 slots <= 32: the fixed-size draw
        labels = torch.randint(0, k, (n, l), generator=g)
        labels[0, -1] = -1
        padded = torch.cat([labels, torch.full((n, 33), -1)], dim=1)   # > 32 slots: the unique branch
        pfc.generator.manual_seed(11)
        fixed, cols = pfc._sample(labels)
        after_fixed = pfc.generator.get_state()
        pfc.generator.manual_seed(11)
        ref, ref_cols = pfc._sample(padded)
        assert torch.equal(fixed, ref) and fixed.numel() == 32
        assert torch.equal(after_fixed, pfc.generator.get_state())
        assert torch.equal(cols, ref_cols[:, :l])
        assert bool((fixed[cols[labels >= 0]] == labels[labels >= 0]).all())   # every positive sampled
    emb, labels = torch.randn(4, D), torch.randint(0, k, (4, 3))
    pfc(emb, labels)  # the checked first call
    pfc.check_inputs = False
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        e, y = mode.from_tensor(emb).requires_grad_(), mode.from_tensor(labels)
        pfc(e, y).backward()
        assert e.grad is not None and e.grad.shape == emb.shape
