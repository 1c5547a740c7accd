"""train.accum_steps: 4 micro-batches of b are exactly one step at 4b (the trainer's step
function, ``train.accumulate_step``): backbone weights and AdamW state, Partial FC centres
and their row-sparse optimiser state, on one process and on 2 gloo ranks (DDP)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.dist_utils import run_distributed

K, L, B, ACC, STEPS = 40, 2, 3, 4, 3


def _setup(rank: int, world: int):
    from mlcd_train import config as C
    from mlcd_train.models import create_model
    from mlcd_train.partial_fc import PartialFC
    from mlcd_train.trainer.optim import build_optimizer

    torch.manual_seed(0)
    # float64: in fp32 the attention key bias (whose true gradient is 0) gets rounding noise
    # that Adam scales up to lr-sized steps, differently for different batch splits
    net = create_model("ViT-Tiny-4-28", width=32, layers=2, heads=2, output_dim=16).double()
    ocfg = C.OptimConfig(lr=2e-3, weight_decay=0.1)
    out = []
    for _ in range(2):  # two identical copies: accumulated, and one big batch
        m = copy.deepcopy(net)
        pfc = PartialFC(16, K, sample_rate=0.3, scale=16.0, seed=1, dtype=torch.float64)
        model = m
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(m)
        out.append((m, model, pfc, build_optimizer(m, ocfg, torch.device("cpu")),
                    pfc.make_optimizer(2e-3, weight_decay=0.1)))
    return out


def _run(rank: int, world: int):
    from mlcd_train.train import accumulate_step
    from mlcd_train.trainer.data import mix_seed

    (m1, w1, p1, o1, q1), (m2, w2, p2, o2, q2) = _setup(rank, world)
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for step in range(STEPS):
        x = torch.randn(ACC * B, 3, 28, 28, generator=g, dtype=torch.float64)
        y = torch.randint(0, K, (ACC * B, L), generator=g)
        micro = [(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]) for i in range(ACC)]
        res = []
        for model, pfc, opt, popt, batches in ((w1, p1, o1, q1, micro), (w2, p2, o2, q2, [(x, y)])):
            pfc.generator.manual_seed(mix_seed(0, step, rank, 0xFC))
            params = [p for p in (model.module if world > 1 else model).parameters()]
            res.append(accumulate_step(model, pfc, batches, params, 1.0, (opt, popt)))
            opt.zero_grad(set_to_none=True)
            popt.zero_grad(set_to_none=True)
        losses.append(res)
    return {"net": (m1.state_dict(), m2.state_dict()), "pfc": (p1.weight.detach(), p2.weight.detach()),
            "pfc_opt": (q1.shard_state(), q2.shard_state()),
            "opt": ([s["exp_avg_sq"] for s in o1.state.values()], [s["exp_avg_sq"] for s in o2.state.values()]),
            "losses": losses}


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _check(r):
    for (l1, n1, ok1), (l2, n2, ok2) in r["losses"]:
        assert ok1 and ok2
        assert abs(l1 - l2) <= 1e-5 * abs(l2) and abs(n1 - n2) <= 1e-5 * abs(n2)
    a, b = r["net"]
    for k in a:
        assert _rel(a[k], b[k]) <= 1e-5, k
    assert _rel(*r["pfc"]) <= 1e-5
    ra, rb = r["pfc_opt"][0]["rows"], r["pfc_opt"][1]["rows"]
    assert torch.equal(ra["step"], rb["step"])  # the same rows were sampled, as often
    assert int(ra["step"].max()) == STEPS and int((ra["step"] == 0).sum()) > 0
    for name in ("exp_avg", "exp_avg_sq"):
        assert _rel(ra[name], rb[name]) <= 1e-5, name
    for s1, s2 in zip(*r["opt"]):
        assert _rel(s1, s2) <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_accumulation_equals_one_big_step_one_process():
    _check(_run(0, 1))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_accumulation_equals_one_big_step_two_ranks():
    for r in run_distributed(_run, 2, timeout=600):
        _check(r)


def test_accum_steps_must_divide_the_per_rank_batch():
    from mlcd_train import config as C
    from mlcd_train.utils.errors import MLCDError

    cfg = C.build_config(None, ["output_dir=x", "data.synthetic=true", "loss.num_classes=8", "train.steps=1",
                                "train.global_batch_size=12", "train.accum_steps=4"])
    C.validate(cfg, 3)
    with pytest.raises(MLCDError, match="train.accum_steps"):
        C.validate(cfg, 2)
