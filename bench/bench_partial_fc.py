"""PartialFC training step with sampled negatives (sample_rate 0.1) against all classes (1.0).

2 gloo ranks on the CPU (one thread each), k = 1,000,000 classes, d = 512, global batch 256,
l = 8 labels per sample, MLCD loss, row-sparse AdamW on the centres.  One step = forward,
backward and optimiser step of the loss (the backbone is replaced by a leaf embedding tensor).
Both sample rates run in the same processes on the same shard (0.1 first), so the figures
share the machine's load.  Reported: median step time (slowest rank) and peak RSS per rank
against the budget 1.3 x (bytes of the rank's centres + optimiser state) + 1 GB.
Also (one process, one thread): the loss + backward time of the logits kernel alone at a larger
global batch, N = 4096, a 100,000-class shard, l = 8, d = 256, sample_rate 0.1 (median of 5),
where the positives' cosines over the [N, l] label slots run in sample blocks; wall time and the
thread's CPU time (the machine's load shows in the first only).

    python -m bench.bench_partial_fc [--quick] [--classes K] [--repeats N]
    python -m bench.bench_partial_fc --device cuda --world 1 --classes 10000000   # one GPU
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

from bench.common import format_table, median_time, row

GB = 1e9


def _rank_bench(rank, world, k, d, batch, l, repeats, device):
    import torch

    from mlcd_train.partial_fc import PartialFC

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    pfc = PartialFC(d, k, sample_rate=0.1, loss="mlcd", seed=1, device=dev)
    opt = pfc.make_optimizer(lr=1e-3, weight_decay=0.2)
    state_bytes = pfc.weight.numel() * pfc.weight.element_size() + sum(
        t.numel() * t.element_size() for t in opt.state[pfc.weight].values())
    g = torch.Generator(device=dev).manual_seed(100 + rank)
    b = batch // world
    emb = torch.randn(b, d, generator=g, device=dev).requires_grad_()
    labels = torch.randint(0, k, (b, l), generator=g, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        emb.grad = None
        pfc(emb, labels).backward()
        opt.step()
        sync()

    def peak():
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated(dev)
        # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's size,
        # which Linux carries over the fork + exec that started this rank)
        with open("/proc/self/status") as f:
            hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")]
        return int(hwm[0]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    out = {"state_bytes": state_bytes, "num_local": pfc.num_local}
    for rate in (0.1, 1.0):
        pfc.sample_rate = rate
        out[rate] = (median_time(step, repeats=repeats, warmup=1), peak())
    return out


def measure(k: int, d: int = 512, batch: int = 256, l: int = 8, repeats: int = 5, world: int = 2,
            device: str = "cpu") -> list[dict]:
    if world == 1:
        res = [_rank_bench(0, 1, k, d, batch, l, repeats, device)]
    else:
        from tests.dist_utils import run_distributed
        res = run_distributed(_rank_bench, world, (k, d, batch, l, repeats, device), timeout=3600)
    t01 = max(r[0.1][0] for r in res)
    t10 = max(r[1.0][0] for r in res)
    where = f"k={k:,} d={d} batch={batch} l={l} {world} rank(s) {device}"
    rows = [row("partial_fc", "step time s (fwd+bwd+AdamW)", t01, t10, "sample_rate 1.0", t01 / t10,
                "<= 0.35", f"{where}, median of {repeats}, slowest rank")]
    mem = "peak CUDA allocated" if device.startswith("cuda") else "peak RSS"
    for rank, r in enumerate(res):
        budget = 1.3 * r["state_bytes"] + GB
        for rate in (0.1, 1.0):
            rows.append(row("partial_fc", f"{mem} GB rank {rank} rate {rate}", r[rate][1] / GB, budget / GB,
                            "1.3 x (centres + optimiser state) + 1 GB", r[rate][1] / budget, "<= 1.0",
                            f"{r['num_local']:,} local centres, state {r['state_bytes'] / GB:.2f} GB"
                            + ("" if rate == 0.1 else "; peak of both runs (0.1 ran first)")))
    return rows


def measure_kernel(n: int = 4096, k: int = 100_000, d: int = 256, l: int = 8, rate: float = 0.1,
                   repeats: int = 5) -> list[dict]:
    """Loss + backward of PartialFC's kernel on one rank owning all k classes (one thread)."""
    import torch

    from mlcd_train.partial_fc import PartialFC

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pfc = PartialFC(d, k, sample_rate=rate, loss="mlcd", seed=1)
        g = torch.Generator().manual_seed(7)
        emb = torch.randn(n, d, generator=g).requires_grad_()
        labels = torch.randint(0, k, (n, l), generator=g)
        labels[torch.rand(n, l, generator=g) < 0.25] = -1  # padding slots
        labels[:, 0] = labels[:, 0].abs()

        def step():
            pfc.weight.grad = None
            emb.grad = None
            pfc(emb, labels).backward()
        t = median_time(step, repeats=repeats, warmup=1)
        cpu = []  # the thread's CPU time: what a loaded machine's wall time hides
        for _ in range(repeats):
            t0 = time.thread_time()
            step()
            cpu.append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    where = f"N={n} k={k:,} (one shard) l={l} d={d} rate {rate}, 1 thread, median of {repeats}"
    return [row("partial_fc", "kernel loss+backward s", t, None, "", None, None, where),
            row("partial_fc", "kernel loss+backward CPU s", statistics.median(cpu), None, "", None, None,
                where + "; thread CPU time")]


def run(quick: bool = False) -> list[dict]:
    if quick:
        return measure(k=100_000, repeats=5) + measure_kernel()
    return measure(k=1_000_000, repeats=3) + measure_kernel()


def main(argv: list[str] | None = None) -> int:
    from mlcd_core.args import positive_int

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="k = 100,000 and 5 repeats: a fast look")
    ap.add_argument("--classes", type=positive_int, default=None, help="number of classes k (default 1,000,000)")
    ap.add_argument("--dim", type=positive_int, default=512, help="embedding size d (default 512)")
    ap.add_argument("--batch", type=positive_int, default=256, help="global batch (default 256)")
    ap.add_argument("--labels", type=positive_int, default=8, help="labels per sample l (default 8)")
    ap.add_argument("--repeats", type=positive_int, default=None,
                    help="timed steps per sample rate (default 3, quick 5)")
    ap.add_argument("--world", type=positive_int, default=2, help="ranks (default 2 gloo ranks; 1 = this process)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu (default) or cuda (use with --world 1)")
    a = ap.parse_args(argv)
    if a.classes is None and a.repeats is None and a.dim == 512 and a.batch == 256 and a.labels == 8 \
            and a.world == 2 and a.device == "cpu":
        rows = run(quick=a.quick)
    else:
        rows = measure(k=a.classes or (100_000 if a.quick else 1_000_000), d=a.dim, batch=a.batch, l=a.labels,
                       repeats=a.repeats or (5 if a.quick else 3), world=a.world, device=a.device)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
