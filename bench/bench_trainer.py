"""The trainer's overhead: ``mlcd train`` images/s against a bare PyTorch loop, data-wait.

    python -m bench.bench_trainer            # CPU, tiny preset, 3 repeats
    python -m bench.bench_trainer --quick    # fewer steps, 2 repeats
    python -m bench.bench_trainer --gpu      # one GPU: ViT-B/16-224, k = 1M, bf16: img/s and MFU
    python -m bench.bench_trainer --parallel fsdp   # step time of train.parallel=fsdp beside ddp,
                                                    # 2 CPU ranks under torchrun (gloo)
    python -m bench.bench_trainer --cpu-bf16        # ResNet-18-w16-28 with train.cpu_autocast and
                                                    # train.channels_last against fp32, and each
                                                    # against a bare loop doing the same

Reference ("bare loop"): the same model (``ViT-Tiny-4-28``), the same PartialFC loss and
optimisers (AdamW with the trainer's parameter groups, PartialFC's row-sparse AdamW), the
same gradient clipping, one process, over the same in-memory batches; nothing else.

Rows (img/s: median over repeats of the median of the logged windows after the first; the
ratio is the median of the per-repeat ratios, each repeat running the three back to back, so
that the load of a shared machine drifting between repeats cancels out):
  * trainer with ``data.synthetic=true`` (in-memory batches) / bare loop, target >= 0.97;
  * trainer reading shards of the Fashion-MNIST sample through the reader + label join +
    augmentation in one loader worker / bare loop on in-memory tensors, target >= 0.9;
  * the data-wait fraction of that shard run (time blocked on the loader / wall time),
    target <= 0.05.
One torch thread for every process (the benchmark machine has 2 cores; the loader worker
takes the other one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import format_table, row

MODEL = "ViT-Tiny-4-28"
K, L, BATCH = 1000, 4, 64


def _common(steps: int, log_every: int) -> list[str]:
    return [f"model.name={MODEL}", f"train.steps={steps}", f"train.global_batch_size={BATCH}",
            f"train.log_every={log_every}", f"train.save_every={10 * steps}", f"loss.l={L}",
            "loss.sample_rate=0.1", "optim.warmup_steps=10", "train.device=cpu", "seed=0"]


def bare_loop(steps: int, log_every: int, device: str = "cpu", model: str = MODEL, k: int = K,
              batch: int = BATCH, bf16: bool = False, image_size: int | None = None,
              channels_last: bool = False) -> list[float]:
    """img/s of each window of ``log_every`` steps of the plain loop (first window excluded)."""
    from mlcd_train import config as C
    from mlcd_train.models import create_model
    from mlcd_train.partial_fc import PartialFC
    from mlcd_train.trainer.data import SyntheticBatches
    from mlcd_train.trainer.optim import build_optimizer

    torch.manual_seed(0)
    dev = torch.device(device)
    net = create_model(model).to(dev)
    size = image_size or net.config.image_size
    pfc = PartialFC(net.embed_dim, k, sample_rate=0.1, device=dev)
    ocfg = C.OptimConfig()
    opt = build_optimizer(net, ocfg, dev)
    popt = pfc.make_optimizer(ocfg.lr, weight_decay=ocfg.weight_decay, betas=tuple(ocfg.betas), eps=ocfg.eps)
    data = SyntheticBatches(8, batch, size, k, L, 0, 0)
    params = [p for p in net.parameters()]
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(data)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False):
            emb = net(x)
        loss = pfc(emb.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ocfg.clip_grad_norm)
        opt.step()
        popt.step()
        opt.zero_grad(set_to_none=True)
        popt.zero_grad(set_to_none=True)
        if step % log_every == 0:
            float(loss.detach())  # the trainer reads the loss every step; sync here at least per window
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            rates.append(log_every * batch / (t1 - t0))
            t0 = t1
    return rates[1:]


def trainer_run(extra: list[str], steps: int, log_every: int, out: Path) -> tuple[list[float], list[float]]:
    """(img/s per window, data-wait fraction per window) of ``mlcd train``, first window excluded."""
    from mlcd_train import train

    rc = train.main([f"output_dir={out}", "resume=none", *_common(steps, log_every), *extra])
    assert rc == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = rows[1:]
    return [r["img_per_s"] for r in rows], [r["data_wait"] for r in rows]


def make_data(root: Path) -> tuple[Path, Path]:
    """Shards of the shipped sample and a label folder as `mlcd assign` lays it out (labels
    drawn at random: the loss does not care, the data path does the same work)."""
    from mlcd_train.data import shards as S
    from mlcd_train.data.reader import ShardDataset, list_shards, shard_name

    sh = root / "shards"
    assert S.main(["--input", "sample", "--out", str(sh), "--shard-size", "500"]) == 0
    lbl = root / "labels"
    lbl.mkdir()
    rng = np.random.default_rng(0)
    for p in list_shards(sh):
        keys = [s.key for s in ShardDataset([p])]
        np.save(lbl / f"{shard_name(p)}.labels.npy", rng.integers(0, K, (len(keys), L), dtype=np.int32))
        np.save(lbl / f"{shard_name(p)}.keys.npy", np.asarray(keys))
    (lbl / "meta.json").write_text(json.dumps({"k": K, "topk": L, "centroids": "random", "embedder": "none"}))
    return sh, lbl


def run(quick: bool = False) -> list[dict]:
    os.environ.setdefault("MLCD_QUIET", "1")
    # the trainer tunes glibc's malloc for the whole process on its first CPU run (mlcd_core/malloc.py);
    # set it before the first repeat so that the bare loop runs with the same allocator every time
    from mlcd_core.malloc import tune_malloc

    tune_malloc()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:  # run_all goes on with other benchmarks in this process
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[dict]:
    steps, log_every, repeats = (40, 10, 3) if quick else (120, 10, 5)
    bare, syn, shard, wait, r_syn, r_shard = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sh, lbl = make_data(tmp)
        def run_bare(rep):
            bare.append(statistics.median(bare_loop(steps, log_every)))

        def run_syn(rep):
            r, _ = trainer_run(["data.synthetic=true", f"loss.num_classes={K}"], steps, log_every,
                               tmp / f"syn{rep}")
            syn.append(statistics.median(r))

        def run_shard(rep):
            r, w = trainer_run([f"data.shards={sh}", f"data.labels={lbl}", "data.num_workers=1",
                                "data.shuffle_buffer=200"], steps, log_every, tmp / f"shard{rep}")
            shard.append(statistics.median(r))
            wait.append(statistics.median(w))

        for rep in range(repeats):  # interleaved (drifts of the shared machine hit all three), and
            # the order rotates: on the shared VM the later runs of a group tend to measure faster
            order = (run_bare, run_syn, run_shard)
            for f in order[rep % 3:] + order[:rep % 3]:
                f(rep)
            r_syn.append(syn[-1] / bare[-1])
            r_shard.append(shard[-1] / bare[-1])
    b = statistics.median(bare)
    s, d, w = statistics.median(syn), statistics.median(shard), statistics.median(wait)
    rs, rd = statistics.median(r_syn), statistics.median(r_shard)
    note = f"{MODEL}, batch {BATCH}, k {K}, {steps} steps, median of {repeats}"
    return [
        row("trainer", "img/s in-memory data", s, b, "bare PyTorch loop, same model+loss", rs, ">= 0.97",
            note + f"; ratio = median of per-repeat ratios {[round(x, 3) for x in r_syn]}"),
        row("trainer", "img/s from shards", d, b, "bare PyTorch loop, in-memory tensors", rd, ">= 0.9",
            note + f", 1 loader worker; per-repeat ratios {[round(x, 3) for x in r_shard]}"),
        row("trainer", "data-wait fraction", w, 0.05, "target fraction", w / 0.05, "<= 1",
            "time blocked on the loader / wall time, shard run"),
    ]


def run_cpu_bf16(quick: bool = False) -> list[dict]:
    """ResNet-18-w16-28 (the reproduction's student), batch 128, k 1000, in-memory data, one
    thread: the trainer in fp32 and with ``train.cpu_autocast`` + ``train.channels_last``, each
    against a bare loop doing the same (autocast bf16 on the CPU, NHWC images)."""
    from mlcd_core.malloc import tune_malloc
    from mlcd_train.train import cpu_has_fast_bf16

    os.environ.setdefault("MLCD_QUIET", "1")
    tune_malloc()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, batch, k = "ResNet-18-w16-28", 128, K
    steps, log_every, repeats = (30, 5, 2) if quick else (40, 5, 3)
    fast = ["train.precision=bf16", "train.cpu_autocast=true", "train.channels_last=true"]
    got: dict = {"bare32": [], "bare16": [], "ours32": [], "ours16": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(repeats):
                got["bare32"].append(statistics.median(bare_loop(steps, log_every, model=model, k=k, batch=batch)))
                got["bare16"].append(statistics.median(bare_loop(steps, log_every, model=model, k=k, batch=batch,
                                                                 bf16=True, channels_last=True)))
                for key, extra in (("ours32", ["train.precision=fp32"]), ("ours16", fast)):
                    r, _ = trainer_run([f"model.name={model}", f"train.global_batch_size={batch}",
                                        "data.synthetic=true", f"loss.num_classes={k}", *extra],
                                       steps, log_every, Path(tmp) / f"{key}{rep}")
                    got[key].append(statistics.median(r))
    finally:
        torch.set_num_threads(threads)
    m = {key: statistics.median(v) for key, v in got.items()}
    per = lambda a, b: statistics.median(x / y for x, y in zip(got[a], got[b]))  # noqa: E731
    note = f"{model}, batch {batch}, k {k}, {steps} steps, 1 thread, median of {repeats}"
    return [
        row("trainer-cpu-bf16", "img/s cpu_autocast + channels_last", m["ours16"], m["bare16"],
            "bare loop, autocast bf16 + NHWC", per("ours16", "bare16"), ">= 0.97", note),
        row("trainer-cpu-bf16", "img/s fp32", m["ours32"], m["bare32"], "bare loop, fp32",
            per("ours32", "bare32"), ">= 0.97", note),
        row("trainer-cpu-bf16", "speed-up over fp32", m["ours16"], m["ours32"], "trainer fp32",
            per("ours16", "ours32"), None, note + ("" if cpu_has_fast_bf16() else "; this CPU has no native bf16")),
    ]


def run_gpu(steps: int = 60) -> list[dict]:
    """One GPU: ViT-B/16-224, k = 1M, bf16, in-memory data: img/s of the trainer and the bare
    loop, and model FLOPs utilisation (3 x forward FLOPs per image; peak bf16 dense FLOP/s from
    MLCD_PEAK_TFLOPS, default 989 for H100/H200 SXM)."""
    from mlcd_train.models import get_model_config, vit_flops_per_image

    os.environ.setdefault("MLCD_QUIET", "1")
    model, k, batch = "ViT-B-16-224", 1_000_000, 256
    bare = statistics.median(bare_loop(steps, 10, "cuda", model, k, batch, bf16=True))
    with tempfile.TemporaryDirectory() as tmp:
        rates, _ = trainer_run([f"model.name={model}", f"train.global_batch_size={batch}", "data.synthetic=true",
                                f"loss.num_classes={k}", "train.device=cuda", "train.precision=bf16"],
                               steps, 10, Path(tmp) / "gpu")
    ours = statistics.median(rates)
    peak = float(os.environ.get("MLCD_PEAK_TFLOPS", "989")) * 1e12
    flops = 3 * vit_flops_per_image(get_model_config(model))
    return [row("trainer-gpu", "img/s ViT-B/16 k=1M bf16", ours, bare, "bare loop", ours / bare, ">= 0.97"),
            row("trainer-gpu", "MFU", ours * flops / peak, bare * flops / peak, "bare loop MFU",
                ours / bare, None, f"peak {peak / 1e12:.0f} TFLOP/s bf16")]


def run_parallel(modes: list[str], steps: int = 30, nproc: int = 2) -> list[dict]:
    """Median step time (ms) of ``mlcd train`` under torchrun with ``nproc`` gloo ranks on the
    CPU, in-memory data, for each ``train.parallel`` mode (first logged window excluded)."""
    import subprocess

    from tests.dist_utils import free_port

    root = Path(__file__).resolve().parent.parent
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                   "-m", "mlcd_train.train", f"output_dir={out}", *_common(steps, 5), "data.synthetic=true",
                   f"loss.num_classes={K}", f"train.parallel={mode}"]
            env = dict(os.environ, OMP_NUM_THREADS="1", MLCD_QUIET="1",
                       PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            subprocess.run(cmd, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
            rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            times[mode] = statistics.median(1000.0 * BATCH / r["img_per_s"] for r in rows[1:])
    base = times.get("ddp")
    note = f"{MODEL}, batch {BATCH} over {nproc} gloo ranks, k {K}, {steps} steps; shared CPU machine"
    return [row("trainer-parallel", f"ms/step {m}", t, base, "ddp ms/step", t / base if base else None, None, note)
            for m, t in times.items()]


def main(argv: list[str] | None = None) -> None:
    from mlcd_core.args import int_at_least

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the one-GPU ViT-B/16 k=1M measurement instead")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default=None,
                    help="step time of this train.parallel mode beside ddp on 2 CPU ranks (torchrun)")
    ap.add_argument("--steps", type=int_at_least(10), default=30,
                    help="steps per run of --parallel (>= 10: the step time is read from the log's windows)")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="ResNet-18-w16-28: train.cpu_autocast + channels_last against fp32 and a bare loop")
    a = ap.parse_args(argv)
    if a.cpu_bf16:
        print(format_table(run_cpu_bf16(a.quick)))
        return
    if a.parallel:
        print(format_table(run_parallel(sorted({"ddp", a.parallel}), a.steps)))
        return
    print(format_table(run_gpu() if a.gpu else run(a.quick)))


if __name__ == "__main__":
    sys.exit(main())
