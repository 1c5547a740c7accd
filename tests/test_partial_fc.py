"""PartialFC against a dense single-process reference of the loss formulas, on 1 to 3 gloo ranks."""
import math

import pytest
import torch
import torch.nn.functional as F

from mlcd_train.partial_fc import (PartialFC, class_range, load_partial_fc, save_partial_fc,
                                   shard_file_name)
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import run_distributed

S, M = 64.0, 0.3
N, D_IN, D, K, L = 6, 5, 8, 11, 3        # global batch 6 splits over 1, 2, 3 ranks; 11 classes split unevenly
COMBOS = [(loss, mt) for loss in ("mlcd", "mlc", "unicom") for mt in ("arc", "cos")]


# --------------------------------------------------------------------------- dense reference

def ref_phi(c, m, margin_type):
    if margin_type == "cos":
        return c - m
    theta = torch.acos(c.clamp(-1, 1))
    return torch.where(theta + m > math.pi, c - m * math.sin(m), torch.cos(theta + m))


def dense_loss(emb, weight, labels, loss, margin_type, s=S, m=M, classes=None):
    """The paper's formulas over every class (or only ``classes``) with [N, k] masks, float64."""
    e = F.normalize(emb.double(), dim=1)
    w = F.normalize(weight.double(), dim=1)
    cos = e @ w.t()
    n, k = cos.shape
    lab = labels[:, :1] if loss == "unicom" else labels
    pos = torch.zeros(n, k, dtype=torch.bool)
    for i in range(n):
        for y in lab[i].tolist():
            if y >= 0:
                pos[i, y] = True
    sampled = torch.zeros(k, dtype=torch.bool)
    sampled[list(range(k)) if classes is None else list(classes)] = True
    neg = sampled & ~pos
    ninf = torch.tensor(-math.inf, dtype=torch.float64)
    sum_neg = torch.logsumexp(torch.where(neg, s * cos, ninf), 1)          # log sum_N' e^{s cos}
    if loss == "unicom":
        t = s * ref_phi(cos.gather(1, lab), m, margin_type).squeeze(1)
        return (-(t - torch.logaddexp(t, sum_neg))).mean()
    sum_pos = torch.logsumexp(torch.where(pos, -s * ref_phi(cos, m, margin_type), ninf), 1)
    log1p_exp = lambda x: torch.log1p(torch.exp(x))  # noqa: E731  (values stay < ~150 here)
    if loss == "mlcd":
        return (log1p_exp(sum_pos) + log1p_exp(sum_neg)).mean()
    return log1p_exp(sum_pos + sum_neg).mean()


def make_data(seed=0, n=N, d=D, k=K, l=L):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    weight = torch.randn(k, d, generator=g)
    labels = torch.randint(0, k, (n, l), generator=g)
    labels[0, 2] = -1            # padding
    labels[1, 1:] = -1
    labels[3, 2] = labels[3, 1]  # a repeated label counts once
    emb = torch.randn(n, d, generator=g)
    # one positive almost opposite its embedding: exercises the arc guard (theta + m > pi)
    weight[labels[2, 0]] = -emb[2] + 0.05 * torch.randn(d, generator=g)
    return x, emb, weight, labels


def make_pfc(weight, rank=0, world_size=1, **kw):
    kw.setdefault("sample_rate", 1.0)
    pfc = PartialFC(weight.shape[1], weight.shape[0], rank=rank, world_size=world_size, **kw)
    with torch.no_grad():
        pfc.weight.copy_(weight[pfc.class_start:pfc.class_start + pfc.num_local])
    return pfc


# --------------------------------------------------------------------------- one process

@pytest.mark.parametrize("loss,margin_type", COMBOS)
def test_loss_and_gradients_equal_the_dense_formula(loss, margin_type):
    _, emb, weight, labels = make_data()
    pfc = make_pfc(weight, loss=loss, margin_type=margin_type, max_chunk_elems=3 * D)  # column chunks of 3
    e = emb.clone().requires_grad_()
    out = pfc(e, labels)
    out.backward()
    assert out.dtype == torch.float32
    e_ref, w_ref = emb.double().requires_grad_(), weight.double().requires_grad_()
    ref = dense_loss(e_ref, w_ref, labels, loss, margin_type)
    ref.backward()
    assert abs(out.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(e.grad.double(), e_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pfc.weight.grad.double(), w_ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_float64_gradients_match_autograd_of_the_reference_exactly(rate):
    _, emb, weight, labels = make_data(1)
    pfc = make_pfc(weight.double(), sample_rate=rate, max_chunk_elems=2 * D, dtype=torch.float64)
    e = emb.double().requires_grad_()
    pfc(e, labels).backward()
    classes = None if pfc.last_index is None else pfc.last_index.tolist()
    e_ref, w_ref = emb.double().requires_grad_(), weight.double().requires_grad_()
    dense_loss(e_ref, w_ref, labels, "mlcd", "arc", classes=classes).backward()
    torch.testing.assert_close(e.grad, e_ref.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(pfc.weight.grad, w_ref.grad, atol=1e-10, rtol=1e-9)


def test_bf16_autocast_still_computes_the_loss_in_fp32():
    _, emb, weight, labels = make_data(2)
    pfc = make_pfc(weight)
    emb16 = emb.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pfc(emb16, labels)
    assert out.dtype == torch.float32
    ref = dense_loss(emb16.double(), weight, labels, "mlcd", "arc")
    assert abs(out.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))


def test_sampling_keeps_positives_counts_and_equals_restricted_reference():
    k = 200
    _, emb, _, _ = make_data(3)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(k, D, generator=g)
    labels = torch.randint(0, k, (N, L), generator=g)
    pfc = make_pfc(weight, sample_rate=0.1, seed=5, max_chunk_elems=7 * D)  # column chunks of 7
    seen = []
    for _ in range(3):
        pfc.zero_grad()
        e = emb.clone().requires_grad_()
        out = pfc(e, labels)
        out.backward()
        idx = pfc.last_index
        positives = set(labels[labels >= 0].tolist())
        assert positives <= set(idx.tolist())
        assert idx.numel() == max(int(0.1 * k), len(positives)) == 20
        assert idx.unique().numel() == idx.numel()
        e_ref, w_ref = emb.double().requires_grad_(), weight.double().requires_grad_()
        ref = dense_loss(e_ref, w_ref, labels, "mlcd", "arc", classes=idx.tolist())
        ref.backward()
        assert abs(out.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
        torch.testing.assert_close(e.grad.double(), e_ref.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pfc.weight.grad.double(), w_ref.grad, atol=1e-5, rtol=1e-4)
        unsampled = torch.ones(k, dtype=torch.bool)
        unsampled[idx] = False
        assert not pfc.weight.grad[unsampled].any()
        seen.append(tuple(idx.tolist()))
    assert len(set(seen)) == 3  # redrawn each step
    # positives beyond the budget: all positives, nothing else
    many = torch.arange(N * 5).reshape(N, 5)
    pfc(emb, many)
    assert pfc.last_index.tolist() == list(range(N * 5))
    # the generator controls the draw
    pfc.generator.manual_seed(11)
    pfc(emb, labels)
    a = pfc.last_index.clone()
    pfc.generator.manual_seed(11)
    pfc(emb, labels)
    assert torch.equal(a, pfc.last_index)
    # sample_rate 1.0 uses everything
    full = make_pfc(weight, sample_rate=1.0)
    full(emb, labels)
    assert full.last_index is None


def test_bad_input_raises_clear_errors_in_one_process():
    _, emb, weight, labels = make_data()
    pfc = make_pfc(weight)
    bad = labels.clone()
    bad[4, 0] = K
    with pytest.raises(MLCDError, match="outside"):
        pfc(emb, bad)
    bad[4, 0] = -2
    with pytest.raises(MLCDError, match="outside"):
        pfc(emb, bad)
    with pytest.raises(MLCDError, match="labels must be"):
        pfc(emb, labels.unsqueeze(-1))
    with pytest.raises(MLCDError, match="labels must be"):
        pfc(emb, labels.float())
    with pytest.raises(MLCDError, match="batch"):
        pfc(emb, labels[:-1])
    with pytest.raises(MLCDError, match="embedding"):
        pfc(emb[:, :-1], labels)
    uni = make_pfc(weight, loss="unicom")
    with pytest.raises(MLCDError, match="unicom"):
        uni(emb, torch.full((N, 1), -1))
    # a 1-D label vector is one label per sample
    torch.testing.assert_close(uni(emb, labels[:, 0]), uni(emb, labels[:, :1]))


def test_plain_sgd_trains_backbone_and_centres():
    x, _, weight, labels = make_data(4)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D_IN, D)
    pfc = make_pfc(weight, sample_rate=0.5, seed=1)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.01)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = pfc(backbone(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- optimiser

def test_sparse_optimizer_leaves_unsampled_rows_bitwise_unchanged():
    k = 300
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(k, D, generator=g)
    emb = torch.randn(N, D, generator=g)
    labels = torch.randint(0, k, (N, L), generator=g)
    for kind in ("adamw", "sgd"):
        pfc = make_pfc(weight, sample_rate=0.05, seed=2)
        opt = pfc.make_optimizer(lr=0.1, weight_decay=0.1, kind=kind, momentum=0.9)
        opt.rows_per_chunk = 4  # several row chunks
        names = ("step",) + opt.row_state_names()
        for _ in range(3):
            before_w = pfc.weight.detach().clone()
            before_s = {n: opt.state[pfc.weight][n].clone() for n in names}
            opt.zero_grad()
            pfc(emb, labels).backward()
            opt.step()
            sampled = torch.zeros(k, dtype=torch.bool)
            sampled[pfc.last_index] = True
            assert torch.equal(pfc.weight.detach()[~sampled], before_w[~sampled])
            for n in names:
                assert torch.equal(opt.state[pfc.weight][n][~sampled], before_s[n][~sampled])
            assert not torch.equal(pfc.weight.detach()[sampled], before_w[sampled])
            assert torch.equal(opt.state[pfc.weight]["step"][sampled], before_s["step"][sampled] + 1)


def test_sparse_optimizer_accumulates_sampled_rows_and_forgets_skipped_steps():
    k = 300
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(k, D, generator=g)
    emb = torch.randn(N, D, generator=g)
    labels = torch.randint(0, k, (N, L), generator=g)
    pfc = make_pfc(weight, sample_rate=0.05, seed=3)
    opt = pfc.make_optimizer(lr=0.1)
    # a skipped step (zero_grad without step) leaves no trace
    pfc(emb, labels).backward()
    skipped = pfc.last_index.clone()
    opt.zero_grad()
    before = pfc.weight.detach().clone()
    rows = []
    for _ in range(2):  # gradient accumulation over two forwards: the union is updated
        pfc(emb, labels).backward()
        rows.append(pfc.last_index.clone())
    opt.step()
    union = torch.zeros(k, dtype=torch.bool)
    union[torch.cat(rows)] = True
    changed = (pfc.weight.detach() != before).any(1)
    assert torch.equal(changed, union)
    assert not changed[skipped[~union[skipped]]].any()
    assert torch.equal(opt.state[pfc.weight]["step"], union.long())


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_sparse_optimizer_equals_torch_when_every_row_is_sampled(kind):
    _, emb, weight, labels = make_data(6)
    a, b = make_pfc(weight), make_pfc(weight)
    opt_a = a.make_optimizer(lr=0.05, weight_decay=0.1, kind=kind, momentum=0.9, betas=(0.8, 0.99), eps=1e-6)
    opt_a.rows_per_chunk = 4
    if kind == "adamw":
        opt_b = torch.optim.AdamW(b.parameters(), lr=0.05, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    else:
        opt_b = torch.optim.SGD(b.parameters(), lr=0.05, weight_decay=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    for _ in range(4):
        for pfc, opt, sch in ((a, opt_a, sched), (b, opt_b, sched_b)):
            opt.zero_grad()
            pfc(emb, labels).backward()
            opt.step()
            sch.step()
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == pytest.approx(0.05 / 5)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- checkpoints

def test_resharding_3_to_2_to_1_preserves_centres_and_optimizer_state(tmp_path):
    k, d = 11, 4
    full_w = torch.randn(k, d)
    full_m, full_v = torch.randn(k, d), torch.rand(k, d)
    full_step = torch.randint(0, 100, (k,))

    def build(world):
        shards = []
        for r in range(world):
            pfc = PartialFC(d, k, rank=r, world_size=world)
            shards.append((pfc, pfc.make_optimizer(lr=1e-3)))
        return shards

    def concat(shards, name):
        if name == "weight":
            return torch.cat([p.weight.detach() for p, _ in shards])
        return torch.cat([o.state[p.weight][name] for p, o in shards])

    three = build(3)
    assert [(p.class_start, p.num_local) for p, _ in three] == [(0, 4), (4, 4), (8, 3)]
    for p, o in three:
        sl = slice(p.class_start, p.class_start + p.num_local)
        with torch.no_grad():
            p.weight.copy_(full_w[sl])
        st = o.state[p.weight]
        st["exp_avg"].copy_(full_m[sl])
        st["exp_avg_sq"].copy_(full_v[sl])
        st["step"].copy_(full_step[sl])
        save_partial_fc(p, tmp_path / "w3" / shard_file_name(p.rank), o)
    two = build(2)
    for p, o in two:
        load_partial_fc(p, tmp_path / "w3", o)
        save_partial_fc(p, tmp_path / "w2" / shard_file_name(p.rank), o)
    one = build(1)
    load_partial_fc(one[0][0], [tmp_path / "w2" / shard_file_name(r) for r in range(2)], one[0][1])
    for shards in (two, one):
        assert torch.equal(concat(shards, "weight"), full_w)
        assert torch.equal(concat(shards, "exp_avg"), full_m)
        assert torch.equal(concat(shards, "exp_avg_sq"), full_v)
        assert torch.equal(concat(shards, "step"), full_step)
    # a wrong set of shards is refused before anything is copied
    p, o = build(1)[0]
    before = p.weight.detach().clone()
    with pytest.raises(MLCDError, match="complete set"):
        load_partial_fc(p, [tmp_path / "w3" / shard_file_name(r) for r in (0, 2)], o)
    assert torch.equal(p.weight.detach(), before)
    other = PartialFC(d, k + 1)
    with pytest.raises(MLCDError, match="num_classes"):
        load_partial_fc(other, tmp_path / "w2")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / shard_file_name(0)).write_bytes(b"not a checkpoint")
    with pytest.raises(MLCDError, match="pfc_rank0.pt"):
        load_partial_fc(p, tmp_path / "bad")
    sgd = p.make_optimizer(lr=1.0, kind="sgd")
    with pytest.raises(MLCDError, match="optimizer kind"):
        load_partial_fc(p, tmp_path / "w2", sgd)
    # state_dict carries the layout and refuses another one
    sd = two[1][0].state_dict()
    assert sd["_extra_state"]["class_start"] == 6 and sd["_extra_state"]["world_size"] == 2
    assert sd["_extra_state"]["num_classes"] == k and sd["_extra_state"]["embedding_size"] == d
    with pytest.raises(MLCDError, match="load_partial_fc"):
        three[1][0].load_state_dict(sd)


# --------------------------------------------------------------------------- 2 and 3 gloo ranks

def _worker(rank, world, tmp):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, emb, weight, labels = make_data()
    b = N // world
    sl = slice(rank * b, (rank + 1) * b)
    res = {"loss": {}, "errors": []}
    # 1. loss value against the dense reference, every loss and margin
    for loss, mt in COMBOS:
        pfc = make_pfc(weight, rank, world, loss=loss, margin_type=mt)
        res["loss"][(loss, mt)] = (pfc(emb[sl], labels[sl]).item(), dense_loss(emb, weight, labels, loss, mt).item())
    # 2. one SGD step of a DDP backbone + PartialFC, and one step with the sparse AdamW
    for opt_kind in ("sgd", "adamw"):
        torch.manual_seed(0)
        backbone = DDP(torch.nn.Linear(D_IN, D))
        pfc = make_pfc(weight, rank, world)
        if opt_kind == "sgd":
            opts = [torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.1)]
        else:
            opts = [torch.optim.AdamW(backbone.parameters(), lr=0.01, weight_decay=0.1),
                    pfc.make_optimizer(lr=0.01, weight_decay=0.1)]
        for _ in range(2):
            for o in opts:
                o.zero_grad()
            pfc(backbone(x[sl]), labels[sl]).backward()
            for o in opts:
                o.step()
        res[opt_kind] = ([p.detach().clone() for p in backbone.module.parameters()], pfc.weight.detach().clone())
    # 3. sampling: positives kept, counts, loss equals the reference over the union of sampled classes
    pfc = make_pfc(weight, rank, world, sample_rate=0.5)
    out = pfc(emb[sl], labels[sl])
    idx = pfc.last_index + pfc.class_start
    mine = {y for y in labels.flatten().tolist() if pfc.class_start <= y < pfc.class_start + pfc.num_local}
    res["sample"] = (mine <= set(idx.tolist()), idx.numel() == max(int(0.5 * pfc.num_local), len(mine)))
    every = [None] * world
    dist.all_gather_object(every, idx.tolist())
    union = sorted(set(sum(every, [])))
    res["sample_loss"] = (out.item(), dense_loss(emb, weight, labels, "mlcd", "arc", classes=union).item())
    # 4. bad input on ONE rank: every rank raises, then the group still works
    pfc = make_pfc(weight, rank, world)
    cases = {"label out of range": (emb[sl], labels[sl].clone().fill_(K) if rank == 1 else labels[sl]),
             "batch size differs": ((emb[:b + 1], labels[:b + 1]) if rank == 0 else (emb[sl], labels[sl])),
             "label shape": (emb[sl], labels[sl].unsqueeze(-1) if rank == world - 1 else labels[sl])}
    for name, (e, y) in cases.items():
        try:
            pfc(e, y)
            res["errors"].append((name, None))
        except MLCDError as exc:
            res["errors"].append((name, str(exc)))
    res["after_errors"] = pfc(emb[sl], labels[sl]).item()
    # 5. shards written by these ranks load into one process
    save_partial_fc(pfc, f"{tmp}/{shard_file_name(rank)}")
    return res


def _reference_step(opt_kind):
    x, _, weight, labels = make_data()
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D_IN, D)
    pfc = make_pfc(weight)
    if opt_kind == "sgd":
        opts = [torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.1)]
    else:
        opts = [torch.optim.AdamW(backbone.parameters(), lr=0.01, weight_decay=0.1),
                pfc.make_optimizer(lr=0.01, weight_decay=0.1)]
    for _ in range(2):
        for o in opts:
            o.zero_grad()
        pfc(backbone(x), labels).backward()
        for o in opts:
            o.step()
    return [p.detach() for p in backbone.parameters()], pfc.weight.detach()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_one_process(world, tmp_path):
    # spawning and importing DDP are slow on a busy machine: a roomy per-process timeout
    results = run_distributed(_worker, world, (str(tmp_path),), timeout=280)
    _, emb, weight, labels = make_data()
    for res in results:
        for combo, (got, ref) in res["loss"].items():
            assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref)), combo
            assert got == results[0]["loss"][combo][0]  # the same loss, bit for bit, on every rank
        assert res["sample"] == (True, True)
        got, ref = res["sample_loss"]
        assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref))
        for name, msg in res["errors"]:
            assert msg is not None, f"{name}: no error on some rank"
        assert "outside" in res["errors"][0][1] and "rank 1" in res["errors"][0][1]
        assert "batch size differs" in res["errors"][1][1]
        assert f"rank {world - 1}: labels must be" in res["errors"][2][1]
        assert abs(res["after_errors"] - results[0]["after_errors"]) == 0.0
    for kind in ("sgd", "adamw"):
        ref_backbone, ref_w = _reference_step(kind)
        for res in results:
            for got, ref in zip(res[kind][0], ref_backbone):
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        centres = torch.cat([res[kind][1] for res in results])
        torch.testing.assert_close(centres, ref_w, atol=1e-5, rtol=0)
    # the shards saved by W ranks load into one process
    one = PartialFC(D, K)
    load_partial_fc(one, tmp_path)
    assert torch.equal(one.weight.detach(), weight)
    assert [class_range(K, world, r) for r in range(world)] == \
        [(r * (K // world) + min(r, K % world), K // world + (r < K % world)) for r in range(world)]
