"""Small-scale reproduction of MLCD's central claim on the full Fashion-MNIST (60k / 10k).

Hypothesis (the paper's direction, ResNet-50 on ImageNet: Unicom 58.4 vs MLCD 67.2 at 1K
clusters): with the same teacher, clusters and training budget, multi-label cluster
discrimination (loss=mlcd, l=8) gives a better linear probe than single-label (Unicom, l=1),
and stays good as the number of clusters k grows.  Rows, all with the same teacher (pixels
PCA, 64 dims), the same student, the same steps, batch and seed:

  * Unicom (loss=unicom, l=1) and MLCD (loss=mlcd, l=8) at every k of --k-list;
  * MLCD with l in --l-list at --k-main;
  * MLCD l=8 with negative sample rate 1.0 against 0.1 at --k-rate;
  * the teacher's own probe, and the student at its random initialisation.

Each row is scored with ``mlcd probe`` (CLIP-style L-BFGS linear probe + 20-NN) on the test
split.  Output in --work: ``results.json`` (every row with its exact command and seed),
``results.md`` (the table), ``results.png`` (the plot); per row ``runs/<row>/`` (trainer
output, export, probe JSON).  Everything resumes: rerunning skips finished rows.

    python tools/reproduce_fashion_mnist.py --work work/repro             # CPU budget (~40 min on 2 cores)
    python tools/reproduce_fashion_mnist.py --work work/repro_gpu --gpu   # the GPU-sized run

Data: ``mlcd shards --input fashion-mnist`` reads the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist), or pass
--idx-dir with the four IDX files.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlcd_train.utils.errors import MLCDError  # noqa: E402
from mlcd_train.utils.io import atomic_save_json, atomic_write_text  # noqa: E402

# CPU student: ViT-Tiny-4-28 with 7 px patches (17 tokens), width 64, 3 layers.
CPU_MODEL = "{patch_size: 7, width: 64, heads: 2, layers: 3, output_dim: 64}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def call(module: str, argv: list[str]) -> None:
    import importlib

    log(f"python -m {module} {' '.join(argv)}")
    rc = importlib.import_module(module).main(argv)
    if rc:
        raise MLCDError(f"python -m {module} {' '.join(argv)} exited with status {rc}")


def _complete(folder: str) -> bool:
    """True when ``folder/meta.json`` exists and says ``"complete": true`` (embed, assign)."""
    meta = os.path.join(folder, "meta.json")
    if not os.path.exists(meta):
        return False
    with open(meta) as f:
        return bool(json.load(f).get("complete"))


class Repro:
    def __init__(self, args):
        self.a = args
        self.w = Path(args.work).resolve()
        self.w.mkdir(parents=True, exist_ok=True)

    def p(self, *parts) -> str:
        return str(self.w.joinpath(*parts))

    # ------------------------------------------------------------------ shared preparation
    def prepare(self) -> None:
        a = self.a
        for split in ("train", "test"):
            out = self.p("shards", split)
            if not os.path.exists(os.path.join(out, "sizes.json")):
                src = "fashion-mnist" if split == "train" else "fashion-mnist:test"
                if a.idx_dir:
                    stem = "train" if split == "train" else "t10k"
                    src = os.path.join(a.idx_dir, f"{stem}-images-idx3-ubyte.gz")
                call("mlcd_train.data.shards", ["--input", src, "--out", out, "--shard-size", "10000"])
        if not _complete(self.p("emb")):
            call("clustering.embed", ["--shards", self.p("shards", "train"), "--out", self.p("emb"), "--model", "pca",
                                      "--dim", "64", "--image-size", "28", "--pca-fit-samples", "20000",
                                      "--workers", "0", "--batch-size", "1024"])
        topk = max(a.l_list + [8])
        for k in sorted(set(a.k_list + [a.k_main, a.k_rate])):
            cl = self.p(f"clusters_k{k}")
            call("clustering.kmeans", ["--emb", self.p("emb"), "--k", str(k), "--out", cl, "--seed", str(a.seed),
                                       "--niter", "20", "--max-points-per-centroid", "0"])
            lbl = self.p(f"labels_k{k}")
            # assign writes meta.json first (complete=false) and resumes by itself
            if not _complete(lbl):
                call("clustering.assign", ["--emb", self.p("emb"), "--centroids", os.path.join(cl, "centroids.npy"),
                                           "--topk", str(min(topk, k)), "--out", lbl])

    # ------------------------------------------------------------------ rows
    def rows(self) -> list[dict]:
        a = self.a
        rows = [{"row": "teacher", "kind": "teacher"}, {"row": "random_init", "kind": "random"}]
        # the paper's headline comparison (k-main) first, so an interrupted run has it
        for k in sorted(a.k_list, key=lambda k: k != a.k_main):
            rows.append({"row": f"unicom_k{k}", "kind": "train", "loss": "unicom", "l": 1, "k": k, "r": 0.1})
            rows.append({"row": f"mlcd_k{k}_l8", "kind": "train", "loss": "mlcd", "l": 8, "k": k, "r": 0.1})
        for l in a.l_list:
            name = f"mlcd_k{a.k_main}_l{l}"
            if not any(r["row"] == name for r in rows):
                rows.append({"row": name, "kind": "train", "loss": "mlcd", "l": l, "k": a.k_main, "r": 0.1})
        if f"mlcd_k{a.k_rate}_l8" not in [r["row"] for r in rows]:
            rows.append({"row": f"mlcd_k{a.k_rate}_l8", "kind": "train", "loss": "mlcd", "l": 8, "k": a.k_rate,
                         "r": 0.1})
        rows.append({"row": f"mlcd_k{a.k_rate}_l8_r1.0", "kind": "train", "loss": "mlcd", "l": 8, "k": a.k_rate,
                     "r": 1.0})
        return rows

    def train_cmd(self, row: dict) -> list[str]:
        a = self.a
        overrides = [f"output_dir={self.p('runs', row['row'], 'train')}", f"seed={a.seed}",
                     f"data.shards={self.p('shards', 'train')}", f"data.labels={self.p('labels_k%d' % row['k'])}",
                     f"data.num_workers={a.workers}", f"model.name={a.model}", f"model.overrides={a.model_overrides}",
                     f"loss.name={row['loss']}", f"loss.l={row['l']}", f"loss.sample_rate={row['r']}",
                     f"train.steps={a.steps}", f"train.global_batch_size={a.batch_size}",
                     f"train.save_every={a.steps}", f"train.log_every={max(1, a.steps // 50)}",
                     f"optim.warmup_steps={max(1, a.steps // 10)}", f"train.device={a.device}"]
        if a.nproc > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)]
        else:
            launch = [sys.executable]
        return launch + ["-m", "mlcd_train.train", "--config", "fashion_mnist_full"] + overrides

    def probe_argv(self, spec: str, out: str) -> list[str]:
        a = self.a
        train = self.p("shards", "train")
        if a.probe_train_shards:
            from mlcd_train.data.reader import list_shards

            train_list = list_shards(train)
            if a.probe_train_shards < len(train_list):
                if a.probe_train_shards != 1:
                    raise MLCDError("--probe-train-shards: use 1 (the first 10k images) or all shards")
                train = train_list[0]
        return ["--embedder", spec, "--train", train, "--test", self.p("shards", "test"), "--out", out,
                "--json", os.path.join(out, "probe.json"), "--workers", str(a.workers), "--batch-size", "1024",
                "--seed", str(a.seed)] + (["--device", a.device] if a.device != "auto" else [])

    def budget(self) -> dict:
        a = self.a
        return {"steps": a.steps, "batch_size": a.batch_size, "model": a.model, "model_overrides": a.model_overrides,
                "seed": a.seed, "probe_train_shards": a.probe_train_shards}

    def run_row(self, row: dict) -> dict:
        a = self.a
        rdir = self.p("runs", row["row"])
        res_path = os.path.join(rdir, "result.json")
        if os.path.exists(res_path):
            res = json.load(open(res_path))
            if res.get("budget") != self.budget():
                raise MLCDError(f"{res_path}: made with {res.get('budget')}, not {self.budget()}; "
                                f"use another --work (or delete {rdir})")
            return res
        os.makedirs(rdir, exist_ok=True)
        t0 = time.perf_counter()
        commands = []
        train_s = None
        if row["kind"] == "teacher":
            spec = "pca:" + self.p("emb", "pca.npz")
        elif row["kind"] == "random":
            import torch

            from mlcd_train.export import save_native
            from mlcd_train.models import create_model, model_config_to_dict

            import yaml

            torch.manual_seed(a.seed)
            m = create_model(a.model, **yaml.safe_load(a.model_overrides))
            save_native(m.state_dict(), model_config_to_dict(m), os.path.join(rdir, "student.pt"), source="random init")
            spec = "mlcd:" + os.path.join(rdir, "student.pt")
            commands.append(f"# torch.manual_seed({a.seed}); create_model({a.model!r}, **{a.model_overrides})")
        else:
            cmd = self.train_cmd(row)
            commands.append(shlex.join(cmd))
            done = Path(rdir, "train", "checkpoints", f"step_{a.steps:08d}", "meta.json")
            if not done.exists():
                log(f"{row['row']}: {shlex.join(cmd)}")
                t1 = time.perf_counter()
                with open(os.path.join(rdir, "train.log"), "ab") as f:
                    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, MLCD_QUIET="1", OMP_NUM_THREADS=str(a.threads)))
                if rc:
                    raise MLCDError(f"{row['row']}: training failed (status {rc}); see {rdir}/train.log")
                train_s = time.perf_counter() - t1
            export = os.path.join(rdir, "student.pt")
            exp_argv = ["--checkpoint", os.path.join(rdir, "train"), "--out", export]
            call("mlcd_train.export", exp_argv)
            commands.append(shlex.join(["mlcd", "export"] + exp_argv))
            spec = "mlcd:" + export
        pargv = self.probe_argv(spec, os.path.join(rdir, "probe"))
        call("mlcd_train.probe", pargv)
        commands.append(shlex.join(["mlcd", "probe"] + pargv))
        pr = json.load(open(os.path.join(rdir, "probe", "probe.json")))
        res = {**row, "linear_top1": pr["linear"]["top1"], "knn_top1": pr["knn"]["top1"], "l2": pr["linear"]["l2"],
               "n_probe_train": pr["n_train"], "n_probe_test": pr["n_test"], "seed": a.seed,
               "steps": a.steps if row["kind"] == "train" else None,
               "batch_size": a.batch_size if row["kind"] == "train" else None,
               "train_seconds": None if train_s is None else round(train_s, 1),
               "seconds": round(time.perf_counter() - t0, 1), "commands": commands, "budget": self.budget()}
        if row["kind"] == "train":
            from mlcd_train.demo import read_metrics

            recs = read_metrics(os.path.join(rdir, "train", "metrics.jsonl"))
            if recs:
                res["final_loss"] = recs[-1]["loss"]
                res["img_per_s"] = recs[-1].get("img_per_s")
        atomic_save_json(res_path, res)
        log(f"{row['row']}: linear {100 * res['linear_top1']:.2f}%  20-NN {100 * res['knn_top1']:.2f}%")
        return res

    # ------------------------------------------------------------------ report
    def report(self, results: list[dict]) -> str:
        lines = ["| row | loss | k | l | r | linear top-1 | 20-NN top-1 |", "|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['row']} | {r.get('loss', '-')} | {r.get('k', '-')} | {r.get('l', '-')} | "
                         f"{r.get('r', '-')} | {100 * r['linear_top1']:.2f} | {100 * r['knn_top1']:.2f} |")
        return "\n".join(lines)

    def plot(self, results: list[dict]) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from mlcd_train.utils.io import atomic_open

        by = {r["row"]: r for r in results}
        a = self.a
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        ax = axes[0]
        for loss, l, mark in (("unicom", 1, "o"), ("mlcd", 8, "s")):
            ks = [k for k in a.k_list if f"{loss}_k{k}" + ("" if loss == "unicom" else "_l8") in by]
            ys = [100 * by[f"{loss}_k{k}" + ("" if loss == "unicom" else "_l8")]["linear_top1"] for k in ks]
            ax.plot(ks, ys, marker=mark, label=f"{loss} (l={l})")
        for name, style in (("teacher", "--"), ("random_init", ":")):
            if name in by:
                ax.axhline(100 * by[name]["linear_top1"], ls=style, color="grey", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("clusters k")
        ax.set_ylabel("linear probe top-1 (%)")
        ax.set_title("Unicom vs MLCD")
        ax.legend(fontsize=8)
        ax = axes[1]
        ls = [l for l in sorted(a.l_list) if f"mlcd_k{a.k_main}_l{l}" in by]
        ax.plot(ls, [100 * by[f"mlcd_k{a.k_main}_l{l}"]["linear_top1"] for l in ls], marker="s", label="linear")
        ax.plot(ls, [100 * by[f"mlcd_k{a.k_main}_l{l}"]["knn_top1"] for l in ls], marker="^", label="20-NN")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"positive labels l (k={a.k_main})")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("MLCD: number of positives")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.p("results.png")
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        return path

    def run(self) -> int:
        t0 = time.perf_counter()
        self.prepare()
        log(f"prepared shards, teacher embeddings, clusters and labels in {time.perf_counter() - t0:.0f}s")
        results = []
        rows = self.rows()
        if self.a.only:
            rows = [r for r in rows if r["row"] in self.a.only.split(",")]
        for i, row in enumerate(rows):
            log(f"row {i + 1}/{len(rows)}: {row['row']}")
            results.append(self.run_row(row))
            self.save(results, t0)
        path = self.plot(results)
        table = self.save(results, t0)
        print(table)
        print(f"results: {self.p('results.json')}, {self.p('results.md')}, plot {path}")
        return 0

    def save(self, results, t0) -> str:
        table = self.report(results)
        atomic_save_json(self.p("results.json"), {"settings": vars(self.a), "seconds": round(time.perf_counter() - t0),
                                                  "rows": results})
        atomic_write_text(self.p("results.md"), table + "\n")
        return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/repro_fashion_mnist", help="working folder (resumable)")
    p.add_argument("--idx-dir", default=None, help="folder with the four Fashion-MNIST IDX .gz files "
                                                   "(default: the Debian package's)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU-sized run: ViT-Tiny-4-28 (4 px patches), 30 epochs at batch 256, full probe, cuda")
    p.add_argument("--k-list", default="100,1000,5000", help="cluster counts for Unicom vs MLCD")
    p.add_argument("--l-list", default="1,2,4,8,16", help="MLCD positives swept at --k-main")
    p.add_argument("--k-main", type=int, default=1000, help="k of the l sweep")
    p.add_argument("--k-rate", type=int, default=5000, help="k of the sample-rate comparison (r matters only "
                                                          "when k is much larger than the positives of a batch)")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (CPU default 200, GPU 7032)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (CPU default 128, GPU 256)")
    p.add_argument("--model", default="ViT-Tiny-4-28")
    p.add_argument("--model-overrides", default=None, help=f"YAML dict (CPU default {CPU_MODEL}; GPU: none)")
    p.add_argument("--nproc", type=int, default=1, help="training ranks (torchrun when > 1)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per training process")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (training and probe embedding)")
    p.add_argument("--probe-train-shards", type=int, default=None,
                   help="probe on the first N training shards of 10k images (CPU default 1; GPU: all 6)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default cpu; --gpu: cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated row names to run")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    a.k_list = [int(x) for x in a.k_list.split(",")]
    a.l_list = [int(x) for x in a.l_list.split(",")]
    if a.gpu:
        a.steps = a.steps or 7032
        a.batch_size = a.batch_size or 256
        a.model_overrides = a.model_overrides or "{}"
        a.device = a.device or "cuda"
        a.workers = max(a.workers, 6)
    else:
        a.steps = a.steps or 200
        a.batch_size = a.batch_size or 128
        a.model_overrides = a.model_overrides or CPU_MODEL
        a.device = a.device or "cpu"
        a.probe_train_shards = a.probe_train_shards or 1
    return Repro(a).run()


if __name__ == "__main__":
    from mlcd_train.cli import run_stage  # noqa: F401  (same error printing as the stages)

    try:
        sys.exit(main())
    except MLCDError as exc:
        print(f"reproduce_fashion_mnist: error: {exc}", file=sys.stderr)
        sys.exit(2)
