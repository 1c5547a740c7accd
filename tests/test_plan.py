"""mlcd plan: its arithmetic against memory measured on the CPU (torch's CPU allocator, as the
profiler reports it: the bytes of live tensors after every allocation) for small configs."""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from mlcd_train import config as C
from mlcd_train import partial_fc as P
from mlcd_train import plan as PL
from mlcd_train.trainer.optim import build_optimizer
from mlcd_train.utils.errors import MLCDError

SMALL = ["output_dir=/tmp/x", "data.synthetic=true", "loss.num_classes=2000", "loss.l=4", "loss.sample_rate=0.1",
         "model.name=ViT-Tiny-4-28", "model.overrides={width: 64, layers: 4, heads: 2, output_dim: 32}",
         "train.steps=5", "train.global_batch_size=64", "train.precision=fp32", "optim.fused=false"]


def _allocated(fn) -> tuple[int, int]:
    """(peak, final) bytes of CPU tensors allocated by ``fn`` and still live, above its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(m["Total Allocated"] for m in mem) - base, mem[-1]["Total Allocated"] - base


def _rig(cfg, ckpt):
    torch.manual_seed(0)
    model = PL._model(cfg, meta=False).train()
    model.set_grad_checkpointing(ckpt)
    lc = cfg.loss
    pfc = P.PartialFC(model.embed_dim, lc.num_classes, sample_rate=lc.sample_rate, scale=16.0, seed=0)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    popt = pfc.make_optimizer(1e-3, weight_decay=0.1)
    b = cfg.train.global_batch_size
    x = torch.randn(b, 3, model.config.image_size, model.config.image_size)
    y = torch.randint(0, lc.num_classes, (b, lc.l))

    def step():
        loss = pfc(model(x), y)
        loss.backward()
        opt.step()
        popt.step()
        opt.zero_grad(set_to_none=True)
        popt.zero_grad(set_to_none=True)

    step()  # the optimiser state exists from the first step on: measure a later one
    return model, pfc, opt, popt, x, step


@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_memory_measured_on_the_cpu(ckpt):
    cfg = C.build_config(None, SMALL)
    p = PL.plan(cfg, gpus=1, gpu_memory_gb=80, device="cpu")
    m = p["modes"][("ddp", ckpt)]
    model, pfc, opt, popt, x, step = _rig(cfg, ckpt)
    # states, counted directly
    assert m["weights"] == sum(t.nbytes for t in model.parameters())
    assert m["optimizer"] == sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    assert m["pfc_weights"] == pfc.weight.nbytes
    assert m["pfc_optimizer"] == sum(t.nbytes for t in popt.state[pfc.weight].values())
    if not ckpt:  # the tensors autograd saves in the forward pass
        outs = []
        _, kept = _allocated(lambda: outs.append(model(x)))    # the graph stays alive with its output
        assert kept == pytest.approx(m["activations"], rel=0.15), (kept, m["activations"])
    # a whole step (forward, loss, backward, both optimisers) on top of weights and states
    peak, _ = _allocated(step)
    planned = m["total"] - m["weights"] - m["optimizer"] - m["pfc_weights"] - m["pfc_optimizer"] - m["ddp_buckets"]
    assert peak == pytest.approx(planned, rel=0.15), (peak, planned)


def test_fsdp_divides_states_and_the_batch_solver_is_consistent():
    cfg = C.build_config("vit_b32_paper")
    p = PL.plan(cfg, gpus=64, gpu_memory_gb=80)
    ddp, fsdp = p["modes"][("ddp", False)], p["modes"][("fsdp", False)]
    assert fsdp["weights"] * 64 == pytest.approx(ddp["weights"]) and fsdp["optimizer"] * 64 == pytest.approx(
        ddp["optimizer"])
    assert p["pfc_rows"] == 15625 and ddp["pfc_weights"] == 15625 * 512 * 4
    for mode in p["modes"].values():
        b = mode["max_batch"]
        assert b >= 1 and 512 % mode["accum_steps"] == 0 and 512 // mode["accum_steps"] <= b
        q = PL.plan(cfg, gpus=64, gpu_memory_gb=80, batch=b)["modes"]
        r = PL.plan(cfg, gpus=64, gpu_memory_gb=80, batch=b + 1)["modes"]
        key = next(k for k, v in p["modes"].items() if v is mode)
        assert q[key]["total"] <= p["usable"] < r[key]["total"]        # b fits, b + 1 does not
    ck = p["modes"][("ddp", True)]
    assert ck["activations"] < ddp["activations"] / 4 and ck["max_batch"] > ddp["max_batch"]


def test_resnet_plan_and_cli(capsys):
    from mlcd_train.cli import main

    cfg = C.build_config(None, ["loss.num_classes=1000", "model.name=ResNet-10-w16-28", "train.global_batch_size=64"])
    p = PL.plan(cfg, gpus=2, gpu_memory_gb=1, device="cpu")
    assert p["modes"][("ddp", True)]["activations"] < p["modes"][("ddp", False)]["activations"]
    assert main(["plan", "--config", "vit_l14_paper", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "ViT-L-14-224" in out and "largest batch per GPU" in out and "FSDP+ckpt" in out
    assert main(["plan", "--config", "vit_l14_paper", "--gpus", "7"]) == 2
    assert "'train.global_batch_size': 32768 is not divisible by --gpus 7" in capsys.readouterr().err
    with pytest.raises(MLCDError, match="--headroom"):
        PL.main(["--config", "vit_l14_paper", "--gpus", "8", "--headroom", "1.5"])
