"""train.precision=fp16: autocast + torch.amp.GradScaler on CUDA.  On this CPU machine the
step function is driven with a CPU GradScaler (torch supports one), and the trainer's loop
with that scaler forced in."""
from __future__ import annotations

import pytest
import torch

from mlcd_train import config as C
from mlcd_train import partial_fc as P
from mlcd_train import train
from mlcd_train.trainer.checkpoint import list_checkpoints
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import run_distributed


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    pfc = P.PartialFC(8, 30, sample_rate=0.5, scale=16.0, margin=0.2, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, pfc, opt, pfc.make_optimizer(1e-2, weight_decay=0.1, kind="adamw")


def _step(parts, x, y, scaler=None):
    model, pfc, opt, popt = parts
    pfc.generator.manual_seed(7)
    loss = pfc(model(x), y)
    out = train.apply_step(loss, list(model.parameters()), 1.0, (opt, popt), scaler)
    opt.zero_grad(set_to_none=True)
    popt.zero_grad(set_to_none=True)
    return out


def test_scaled_step_equals_the_plain_step():
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    plain = _setup()
    scaled = _setup()                                          # same seed: the same start
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(3):
        lp, gp, ap = _step(plain, x, y)
        ls, gs, as_ = _step(scaled, x, y, scaler)
        assert ap and as_ and ls == pytest.approx(lp) and gs == pytest.approx(gp, rel=1e-6)
    for a, b in zip(plain[0].parameters(), scaled[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plain[1].weight, scaled[1].weight, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0 ** 12                     # no overflow, not yet grown


def test_overflow_skips_the_whole_step_and_lowers_the_scale():
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    parts = _setup()
    before = [p.detach().clone() for p in parts[0].parameters()]
    centres = parts[1].weight.detach().clone()
    # the scaled gradient overflows fp32; the backoff brings the next scale to 2**17
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -110)
    loss, gnorm, applied = _step(parts, x, y, scaler)
    assert not applied and not torch.isfinite(torch.tensor(gnorm)) and torch.isfinite(torch.tensor(loss))
    assert all(torch.equal(a, b) for a, b in zip(before, parts[0].parameters()))
    assert torch.equal(centres, parts[1].weight)
    # the skipped step left the AdamW state as a fresh one (absent, or step 0 and zero moments)
    assert all(not torch.is_tensor(v) or not v.any() for st in parts[2].state.values() for v in st.values())
    assert int(parts[3].state[parts[1].weight]["step"].sum()) == 0     # no centre row moved
    assert scaler.get_scale() == 2.0 ** 17
    assert _step(parts, x, y, scaler)[2] and not torch.equal(centres, parts[1].weight)  # the next one applies


def test_precision_key():
    base = ["output_dir=/tmp/x", "data.synthetic=true", "loss.num_classes=10", "train.steps=5",
            "train.global_batch_size=8"]
    assert C.validate(C.build_config(None, base + ["train.precision=fp16"])).train.precision == "fp16"
    with pytest.raises(MLCDError, match="'train.precision': must be one of bf16, fp16, fp32, got 'fp8'"):
        C.validate(C.build_config(None, base + ["train.precision=fp8"]))
    assert train.make_scaler("fp16", torch.device("cpu")) is None
    assert train.make_scaler("bf16", torch.device("cuda")) is None
    assert isinstance(train.autocast_context("fp16", torch.device("cpu")), type(train.nullcontext()))


def _args(out, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", "model.name=ViT-Tiny-4-28",
            "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}", "train.global_batch_size=4",
            "train.log_every=1", "optim.warmup_steps=0", "train.steps=3", *extra]


def test_trainer_loop_with_a_scaler_matches_fp32_and_saves_its_state(tmp_path, monkeypatch, capsys):
    assert train.main(_args(tmp_path / "fp32", "train.precision=fp32")) == 0
    assert train.main(_args(tmp_path / "cpu16", "train.precision=fp16")) == 0
    assert "train.precision=fp16 runs in fp32 on the CPU" in capsys.readouterr().err
    made = []

    def forced(precision, device):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2))
        return made[-1]

    monkeypatch.setattr(train, "make_scaler", forced)
    assert train.main(_args(tmp_path / "scaled", "train.precision=fp16")) == 0
    assert made and made[0].get_scale() == 2.0 ** 11            # grew once after 2 clean steps: the path ran

    def final(out):
        folder = list_checkpoints(out / "checkpoints")[-1][1]
        return (torch.load(folder / "model.pt", weights_only=True)["state_dict"],
                torch.load(folder / "trainer_state.pt", weights_only=True))
    ref, st_ref = final(tmp_path / "fp32")
    got, st = final(tmp_path / "scaled")
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert st_ref["scaler"] is None and st["scaler"]["scale"] == 2.0 ** 11
    # a resume restores the scale the run had reached
    assert train.main(_args(tmp_path / "scaled", "train.precision=fp16", "train.steps=4")) == 0
    assert made[-1].get_scale() == 2.0 ** 12                    # 2 ** 10 had the state not been loaded


def _watch_host_reads(monkeypatch) -> list:
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name: reads.append(_n) or _r(self, *a))
    return reads


@pytest.mark.parametrize("init_scale", [2.0 ** 12, 2.0 ** 127])  # a clean step, an overflowing one
def test_the_scaled_step_reads_nothing_on_the_host(monkeypatch, init_scale):
    """sync=False with a GradScaler: unscale, clip, the guarded steps and scaler.update() stay on
    the device (the scaler's own step() would read its overflow flag); the verdict matches."""
    model, pfc, _, popt = _setup()
    # the trainer's AdamW is the fused one (the plain one reads its CPU step count, a Python float)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0 ** -110)
    reads = _watch_host_reads(monkeypatch)
    loss = pfc(model(x), y)
    reads.clear()  # PartialFC's own input check reads its label range
    loss_t, gnorm_t, ok_t = train.apply_step(loss, list(model.parameters()), 1.0, (opt, popt), scaler, sync=False)
    assert reads == []
    assert torch.is_tensor(ok_t) and bool(ok_t) == (init_scale < 2.0 ** 100)
    assert scaler.get_scale() == (init_scale if init_scale < 2.0 ** 100 else 2.0 ** 17)


def test_an_overflow_in_the_centres_alone_skips_the_step():
    """The centres' gradient overflows, the backbone's does not (its norm is finite): the flag
    unscale_ records for the Partial FC optimiser skips the whole step and lowers the scale."""
    parts = _setup()
    model, pfc, opt, popt = parts
    before = [p.detach().clone() for p in model.parameters()]
    centres = pfc.weight.detach().clone()
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    pfc.weight.register_hook(lambda g: g * float("inf"))
    loss = pfc(model(x), y)
    loss_v, gnorm_v, applied = train.apply_step(loss, list(model.parameters()), 1.0, (opt, popt), scaler)
    assert torch.isfinite(torch.tensor([loss_v, gnorm_v])).all() and not applied
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(centres, pfc.weight) and scaler.get_scale() == 2.0 ** 11


def _overflow_on_rank_0(rank, world_size):
    import torch
    from mlcd_train import partial_fc as P
    from mlcd_train import train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    pfc = P.PartialFC(8, 30, sample_rate=1.0, scale=16.0, margin=0.2, seed=0)   # 15 centres a rank
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    popt = pfc.make_optimizer(1e-2, kind="adamw")
    before = [p.detach().clone() for p in model.parameters()] + [pfc.weight.detach().clone()]
    if rank == 0:  # this rank's own centres overflow; every backbone gradient stays finite
        pfc.weight.register_hook(lambda g: g * float("inf"))
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 12, generator=g), torch.randint(0, 30, (4, 2), generator=g)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    loss = pfc(model(x), y)
    _, _, ok = train.apply_step(loss, list(model.parameters()), 1.0, (opt, popt), scaler, sync=False)
    after = list(model.parameters()) + [pfc.weight]
    return bool(ok), scaler.get_scale(), all(torch.equal(a, b) for a, b in zip(before, after))


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank():
    """2 gloo ranks: rank 0's Partial FC gradient overflows, rank 1's does not (the centres'
    gradient is each rank's own): both ranks skip, keep their weights, and lower their scale
    alike (a rank that applied the step would leave the backbones apart for good)."""
    res = run_distributed(_overflow_on_rank_0, 2, (), timeout=180)
    assert res == [(False, 2.0 ** 11, True), (False, 2.0 ** 11, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a host sync is a CUDA notion")
def test_the_scaled_cuda_step_makes_no_host_sync():
    """On a GPU, torch's sync debug mode raises on any synchronising call inside the step
    (what the Python-level watch above cannot see: .cpu(), nonzero, a blocking copy)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).to(dev)
    pfc = P.PartialFC(8, 30, sample_rate=1.0, scale=16.0, margin=0.2, seed=0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    popt = pfc.make_optimizer(1e-2, kind="adamw")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    x, y = torch.randn(6, 12, device=dev), torch.randint(0, 30, (6, 2), device=dev)
    for _ in range(2):  # the second step: the optimisers' state exists
        pfc.check_inputs = False
        loss = pfc(model(x), y)
        torch.cuda.set_sync_debug_mode("error")
        try:
            train.apply_step(loss, list(model.parameters()), 1.0, (opt, popt), scaler, sync=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad(set_to_none=True)
        popt.zero_grad(set_to_none=True)


def _resnet_args(out, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2",
            "model.name=ResNet-10-w16-28", "model.overrides={output_dim: 16}", "train.global_batch_size=8",
            "train.device=cpu",
            "train.log_every=1", "optim.warmup_steps=0", "train.steps=2", *extra]


def _watch_convs(monkeypatch) -> list:
    """(input dtype, input is channels_last, output dtype) of every Conv2d call on a training batch
    (8 images; the trainer's one-image FLOP count runs outside the step)."""
    seen, conv = [], torch.nn.Conv2d.forward

    def watched(self, x):
        out = conv(self, x)
        if x.shape[0] == 8:
            seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                         out.dtype))
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", watched)
    return seen


def _final_weights(out):
    folder = list_checkpoints(out / "checkpoints")[-1][1]
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_cpu_autocast_runs_the_tower_in_bf16_and_keeps_fp32_weights(tmp_path, monkeypatch, capsys):
    seen = _watch_convs(monkeypatch)
    assert train.main(_resnet_args(tmp_path / "fp32")) == 0
    assert seen and {s[2] for s in seen} == {torch.float32}        # default: fp32 on the CPU
    assert "train.cpu_autocast=true autocasts bf16" in capsys.readouterr().err
    seen.clear()
    assert train.main(_resnet_args(tmp_path / "bf16", "train.cpu_autocast=true")) == 0
    assert "bf16 autocast on the CPU (train.cpu_autocast)" in capsys.readouterr().err or not train.cpu_has_fast_bf16()
    assert seen and {s[2] for s in seen} == {torch.bfloat16}       # every convolution computed in bf16
    a, b = _final_weights(tmp_path / "fp32"), _final_weights(tmp_path / "bf16")
    assert a.keys() == b.keys() and all(b[k].dtype == a[k].dtype for k in a)   # fp32 parameters kept
    diffs = [float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()]
    assert 0 < max(diffs) < 0.05   # different numerics, the same optimisation


def test_cpu_autocast_needs_bf16():
    base = ["output_dir=/tmp/x", "data.synthetic=true", "loss.num_classes=10", "train.steps=5",
            "train.global_batch_size=8"]
    with pytest.raises(MLCDError, match="'train.cpu_autocast': autocasts bf16 only"):
        C.validate(C.build_config(None, base + ["train.precision=fp16", "train.cpu_autocast=true"]))
    with pytest.raises(MLCDError, match="'train.channels_last': expected true or false"):
        C.validate(C.build_config(None, base + ["train.channels_last=3"]))


def test_channels_last_hands_the_tower_nhwc_images_and_trains_the_same(tmp_path, monkeypatch):
    seen = _watch_convs(monkeypatch)
    assert train.main(_resnet_args(tmp_path / "nchw", "train.precision=fp32")) == 0
    assert seen and not any(s[1] for s in seen)
    seen.clear()
    assert train.main(_resnet_args(tmp_path / "nhwc", "train.precision=fp32", "train.channels_last=true")) == 0
    assert seen and all(s[1] for s in seen)   # the first convolution's input and every one after it
    a, b = _final_weights(tmp_path / "nchw"), _final_weights(tmp_path / "nhwc")
    for k in a:
        assert b[k].is_contiguous(), k        # the checkpoint's tensors keep their layout
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_fast_bf16_means_avx512_bf16_or_amx_not_onednn_emulation(monkeypatch):
    # oneDNN's own bf16 check is true on any AVX512BW/VL/DQ CPU, where bf16 is emulated
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for avx512_bf16, amx, fast in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert train.cpu_has_fast_bf16() is fast
