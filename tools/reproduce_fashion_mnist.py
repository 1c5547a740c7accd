"""Small-scale reproduction of MLCD on the full Fashion-MNIST (60k / 10k), several seeds a row.

Two questions, one teacher (pixels PCA-whitened to 64 dimensions: weights-free, nothing is
downloaded), no ground-truth label used in training, every student scored by ``mlcd probe``
(CLIP-style L-BFGS linear probe fitted on all 60k training images + 20-NN) on the 10k test
images, mean and standard deviation over ``--seeds``:

1. **Does the student beat its teacher?** (the paper's headline: the MLCD student surpasses
   the CLIP model that made its clusters).  Rows ``teacher``, ``random_init``,
   ``mlcd_k1000_l8`` (the ResNet student, 1 epoch) and ``best`` (a wider student, 3 epochs);
   ``--rows full`` (or by name) adds ``best_round2`` (one re-clustering round: the ``best``
   student of the same seed is the teacher) and ``vit_mlcd`` (the earlier ViT student).
2. **Multi-label vs single-label** (ResNet-50 on ImageNet in the paper: Unicom 58.4 vs MLCD
   67.2 at 1K clusters): ``unicom_k1000`` vs ``mlcd_k1000_l8``, same student and budget;
   ``--rows full`` adds the k sweep (Unicom and MLCD at every k of --k-list), the l sweep at
   --k-main, the negative sample rate 1.0 vs 0.1 for both losses at --k-main and --k-rate
   (``mlcd_k<k>_l8_r1.0``, ``unicom_k<k>_r1.0``) and ``unicom_best`` (Unicom with
   the ``best`` row's student and budget).  Any of these rows can also be named in --rows.

Output in --work: ``results.json`` (every run with its exact commands and seed, and the
per-row aggregates), ``results.md`` (the table), ``results.png`` (the plot); per run
``runs/<row>/seed<s>/``.  Everything resumes: rerunning skips finished runs.  ``--jobs 2``
trains two runs at a time with one thread each (faster on 2 cores than one run with two).

    python tools/reproduce_fashion_mnist.py --work work/repro             # main rows: 75 min on 2 idle cores
    python tools/reproduce_fashion_mnist.py --work work/repro --rows full
    python tools/reproduce_fashion_mnist.py --work work/repro_gpu --gpu   # GPU-sized budgets

Data: ``mlcd shards --input fashion-mnist`` reads the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist), or pass
--idx-dir with the four IDX files.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clustering.assign import assign  # noqa: E402
from clustering.embed import embed  # noqa: E402
from clustering.kmeans import cluster_folder  # noqa: E402
from mlcd_core.args import SEED_MAX, nonneg_int, positive_int, seed_int  # noqa: E402
from mlcd_core.errors import MLCDError  # noqa: E402
from mlcd_core.io import atomic_save_json, atomic_write_text, check_out_separate, load_json  # noqa: E402
from mlcd_train.data.shards import make_shards  # noqa: E402
from mlcd_train.export import export as export_fn  # noqa: E402
from mlcd_train.trainer.checkpoint import step_dir  # noqa: E402

# The earlier CPU student (row vit_mlcd): ViT-Tiny-4-28 with 7 px patches (17 tokens), width 64, 3 layers.
VIT_MODEL = "ViT-Tiny-4-28"
VIT_OVERRIDES = "{patch_size: 7, width: 64, heads: 2, layers: 3, output_dim: 64}"
# The ResNet student and the recipe of the best row (measured: docs/reproduction.md)
STUDENT = "ResNet-18-w16-28"
BEST_MODEL = "ResNet-18-w32-28"
BEST_SET: list[str] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shown(fn, *args, **kwargs) -> str:
    """``module.fn(args, k=v)``: a stage call as the log and results.json record it."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{fn.__module__}.{fn.__name__}({', '.join(parts)})"


def call(fn, *args, **kwargs):
    """A stage's Python function, logged; its MLCDError stops the reproduction with one line."""
    log(shown(fn, *args, **kwargs))
    return fn(*args, **kwargs)


def _complete(folder: str) -> bool:
    """True when ``folder/meta.json`` exists and says ``"complete": true`` (embed, assign).  The
    file is read as the stages read it (a regular JSON object of bounded size); anything else
    is an MLCDError naming it."""
    meta = os.path.join(folder, "meta.json")
    if not os.path.lexists(meta):
        return False
    done = load_json(meta, expect=dict).get("complete", False)
    if not isinstance(done, bool):
        raise MLCDError(f"{meta}: key 'complete' should be true or false, found {str(done)[:40]!r}")
    return done


def load_result(path: str, row: dict, seed: int, budget: dict) -> dict:
    """A finished run's ``result.json`` read back on resume, checked before it is used: an
    object made for this row, seed and budget, with both accuracies numbers in [0, 1]; else
    an MLCDError naming the file (it is reported and plotted as is)."""
    res = load_json(path, expect=dict)
    if res.get("budget") != budget:
        raise MLCDError(f"{path}: made with {str(res.get('budget'))[:300]}, not {budget}; "
                        f"use another --work (or delete {os.path.dirname(path)})")
    for key, value in {**row, "seed": seed}.items():
        if res.get(key) != value or type(res.get(key)) is not type(value):
            raise MLCDError(f"{path}: key {key!r} is {str(res.get(key))[:60]!r}, not {value!r} of the run it stands "
                            f"for; delete {os.path.dirname(path)} to redo it")
    for key in ("linear_top1", "knn_top1"):
        v = res.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise MLCDError(f"{path}: key {key!r} should be an accuracy in [0, 1], found {str(v)[:40]!r}; "
                            f"delete {os.path.dirname(path)} to redo the run")
    return res


_GLOBAL_RNG = threading.Lock()
_IN_PROCESS = threading.Lock()


class Repro:
    def __init__(self, args):
        self.a = args
        self.w = Path(args.work).resolve()
        self.w.mkdir(parents=True, exist_ok=True)

    def p(self, *parts) -> str:
        return str(self.w.joinpath(*parts))

    def needed_ks(self, rows: list[dict]) -> list[int]:
        """The cluster counts whose labels the rows train on (round 2 clusters its own)."""
        return sorted({r["k"] for r in rows if r["kind"] == "train" and r["labels"] != "round2"})

    # ------------------------------------------------------------------ shared preparation
    def prepare(self, rows: list[dict]) -> None:
        a = self.a
        for split in ("train", "test"):
            out = self.p("shards", split)
            if not os.path.exists(os.path.join(out, "sizes.json")):
                src = "fashion-mnist" if split == "train" else "fashion-mnist:test"
                if a.idx_dir:
                    stem = "train" if split == "train" else "t10k"
                    src = os.path.join(a.idx_dir, f"{stem}-images-idx3-ubyte.gz")
                call(make_shards, src, out, shard_size=10000)
        if not _complete(self.p("emb")):
            call(embed, self.p("shards", "train"), self.p("emb"), "pca", dim=64, image_size=28, pca_fit_samples=20000,
                 workers=0, batch_size=1024)
        topk = max(a.l_list + [8])
        for k in self.needed_ks(rows):
            self.cluster_and_assign(self.p("emb"), k, self.p(f"clusters_k{k}"), self.p(f"labels_k{k}"), topk)

    def cluster_and_assign(self, emb: str, k: int, cl: str, lbl: str, topk: int) -> None:
        call(cluster_folder, emb, k, cl, seed=self.a.seed, niter=20, max_points_per_centroid=0)
        # assign writes meta.json first (complete=false) and resumes by itself
        if not _complete(lbl):
            call(assign, emb, os.path.join(cl, "centroids.npy"), lbl, topk=min(topk, k))

    # ------------------------------------------------------------------ rows
    def rows(self) -> list[dict]:
        a = self.a
        km = a.k_main
        base = {"kind": "train", "model": a.model, "overrides": a.model_overrides, "steps": a.steps,
                "set": list(a.set or []), "labels": f"labels_k{km}", "k": km, "l": 8, "r": 0.1, "loss": "mlcd"}
        rows = [{"row": "teacher", "kind": "teacher"}, {"row": "random_init", "kind": "random"},
                {**base, "row": f"mlcd_k{km}_l8"},
                {**base, "row": f"unicom_k{km}", "loss": "unicom", "l": 1},
                {**base, "row": "best", "model": a.best_model, "steps": a.best_steps,
                 "set": base["set"] + list(a.best_set)}]
        if a.rows != "main":  # the rows beyond the main set (about 100 minutes) can also be picked by name
            rows.append({**base, "row": "best_round2", "model": a.best_model, "steps": a.best_steps,
                         "set": base["set"] + list(a.best_set), "labels": "round2", "after": "best"})
            rows.append({**base, "row": "vit_mlcd", "model": VIT_MODEL, "overrides": VIT_OVERRIDES})
            rows.append({**base, "row": "unicom_best", "model": a.best_model, "steps": a.best_steps, "loss": "unicom",
                         "l": 1, "set": base["set"] + list(a.best_set)})
            for k in a.k_list:
                if k != km:
                    rows.append({**base, "row": f"unicom_k{k}", "loss": "unicom", "l": 1, "k": k,
                                 "labels": f"labels_k{k}"})
                    rows.append({**base, "row": f"mlcd_k{k}_l8", "k": k, "labels": f"labels_k{k}"})
            for l in a.l_list:
                if l != 8:
                    rows.append({**base, "row": f"mlcd_k{km}_l{l}", "l": l})
            kr = a.k_rate
            if kr not in a.k_list:
                rows.append({**base, "row": f"mlcd_k{kr}_l8", "k": kr, "labels": f"labels_k{kr}"})
            for kk in sorted({km, kr}):  # every centre in every step, both losses, at the main k and --k-rate
                rows.append({**base, "row": f"mlcd_k{kk}_l8_r1.0", "k": kk, "labels": f"labels_k{kk}", "r": 1.0})
                rows.append({**base, "row": f"unicom_k{kk}_r1.0", "loss": "unicom", "l": 1, "k": kk,
                             "labels": f"labels_k{kk}", "r": 1.0})
        if a.rows not in ("main", "full"):
            wanted = a.rows.split(",")
            known = {r["row"] for r in rows}
            bad = sorted(set(wanted) - known)
            if bad:
                raise MLCDError(f"--rows: unknown row(s) {bad}; main rows: {sorted(known)} (or 'main', 'full')")
            rows = [r for r in rows if r["row"] in wanted]
            picked = {r["row"] for r in rows}
            lacking = [f"{r['row']} needs {r['after']}" for r in rows if "after" in r and r["after"] not in picked]
            if lacking:  # round 2's teacher is the earlier row's student of the same seed
                raise MLCDError(f"--rows: {'; '.join(lacking)} in the same --rows (it embeds with that student)")
        return rows

    def rdir(self, row: dict, seed: int) -> str:
        return self.p("runs", row["row"], f"seed{seed}")

    def labels_dir(self, row: dict, seed: int) -> str:
        if row["labels"] == "round2":
            return os.path.join(self.rdir(row, seed), "labels")
        return self.p(row["labels"])

    def prepare_round2(self, row: dict, seed: int) -> list[str]:
        """Round 2's teacher: the seed's ``best`` student embeds the corpus, then cluster + assign."""
        d = self.rdir(row, seed)
        export = os.path.join(self.rdir({"row": row["after"]}, seed), "student.pt")
        emb = os.path.join(d, "emb")
        args, kw = (self.p("shards", "train"), emb, "mlcd:" + export), {"workers": 0, "batch_size": 512}
        if not _complete(emb):
            call(embed, *args, **kw)
        self.cluster_and_assign(emb, row["k"], os.path.join(d, "clusters"), os.path.join(d, "labels"), 8)
        return [shown(embed, *args, **kw)]

    def train_cmd(self, row: dict, seed: int) -> list[str]:
        a = self.a
        steps = row["steps"]
        overrides = [f"output_dir={os.path.join(self.rdir(row, seed), 'train')}", f"seed={seed}",
                     f"data.shards={self.p('shards', 'train')}", f"data.labels={self.labels_dir(row, seed)}",
                     f"data.num_workers={a.workers}", f"model.name={row['model']}",
                     f"model.overrides={row['overrides']}", f"loss.name={row['loss']}", f"loss.l={row['l']}",
                     f"loss.sample_rate={row['r']}", f"train.steps={steps}", f"train.global_batch_size={a.batch_size}",
                     f"train.save_every={steps}", f"train.log_every={max(1, steps // 50)}",
                     f"optim.warmup_steps={max(1, steps // 10)}", f"train.device={a.device}", *row["set"]]
        if a.nproc > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)]
        else:
            launch = [sys.executable]
        return launch + ["-m", "mlcd_train.train", "--config", "fashion_mnist_full"] + overrides

    def probe_kwargs(self, out: str) -> dict:
        a = self.a
        train = self.p("shards", "train")
        if a.probe_train_shards:
            from mlcd_core.reader import list_shards

            train_list = list_shards(train)
            if a.probe_train_shards < len(train_list):
                if a.probe_train_shards != 1:
                    raise MLCDError("--probe-train-shards: use 1 (the first 10k images) or all shards")
                train = train_list[0]
        return {"train": train, "test": self.p("shards", "test"), "out": out, "json": os.path.join(out, "probe.json"),
                "workers": 0, "batch_size": 1024, "seed": 0, "device": a.device if a.device != "auto" else None}

    def probe_cmd(self, spec: str, pkw: dict) -> list[str]:
        """``mlcd probe`` with :meth:`probe_kwargs` as its flags."""
        cmd = [sys.executable, "-m", "mlcd_train.probe", "--embedder", spec, "--train", pkw["train"], "--test",
               pkw["test"], "--out", pkw["out"], "--json", pkw["json"], "--workers", str(pkw["workers"]),
               "--batch-size", str(pkw["batch_size"]), "--seed", str(pkw["seed"])]
        return cmd + (["--device", pkw["device"]] if pkw["device"] else [])

    def in_process(self, threads: int, fn, *args, **kwargs):
        """A stage function of one (row, seed) run in this process: one at a time (they set torch's
        global seed and thread count, which the --jobs threads share), quiet, ``threads`` threads."""
        import torch

        with _IN_PROCESS:
            before, quiet = torch.get_num_threads(), os.environ.get("MLCD_QUIET")
            torch.set_num_threads(threads)
            os.environ["MLCD_QUIET"] = "1"
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(before)
                if quiet is None:
                    os.environ.pop("MLCD_QUIET", None)
                else:
                    os.environ["MLCD_QUIET"] = quiet

    def budget(self, row: dict) -> dict:
        a = self.a
        keys = ("model", "overrides", "steps", "set", "loss", "l", "k", "r", "labels")
        return {"batch_size": a.batch_size, "probe_train_shards": a.probe_train_shards,
                **{k: row[k] for k in keys if k in row}}

    def _sub(self, argv: list[str], log_path: str, threads: int) -> None:
        env = dict(os.environ, MLCD_QUIET="1", OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log_path, "ab") as f:
            rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        if rc:
            raise MLCDError(f"{shlex.join(argv[:4])} ... failed (status {rc}); see {log_path}")

    def run_one(self, row: dict, seed: int, threads: int) -> dict:
        """One (row, seed): train (a subprocess: --jobs trainings overlap, each with its own torch
        generator and threads, and torchrun when --nproc > 1), export (in this process), probe (a
        subprocess too); returns its result, cached in result.json."""
        a = self.a
        d = self.rdir(row, seed)
        res_path = os.path.join(d, "result.json")
        if os.path.lexists(res_path):
            return load_result(res_path, row, seed, self.budget(row))
        os.makedirs(d, exist_ok=True)
        t0 = time.perf_counter()
        commands, train_s = [], None
        if row["kind"] == "teacher":
            spec = "pca:" + self.p("emb", "pca.npz")
        elif row["kind"] == "random":
            import torch
            import yaml

            from mlcd_train.export import save_native
            from mlcd_train.models import create_model, model_config_to_dict

            with _GLOBAL_RNG:  # pool threads share torch's global generator
                torch.manual_seed(seed)
                m = create_model(a.best_model, **yaml.safe_load(a.model_overrides))
            save_native(m.state_dict(), model_config_to_dict(m), os.path.join(d, "student.pt"), source="random init")
            spec = "mlcd:" + os.path.join(d, "student.pt")
            commands.append(f"# torch.manual_seed({seed}); create_model({a.best_model!r}, **{a.model_overrides})")
        else:
            if row["labels"] == "round2":
                commands += self.prepare_round2(row, seed)
            cmd = self.train_cmd(row, seed)
            commands.append(shlex.join(cmd))
            done = step_dir(Path(d, "train", "checkpoints"), row["steps"]) / "meta.json"
            if not done.exists():
                log(f"{row['row']} seed {seed}: {shlex.join(cmd)}")
                t1 = time.perf_counter()
                self._sub(cmd, os.path.join(d, "train.log"), threads)
                train_s = time.perf_counter() - t1
            export = os.path.join(d, "student.pt")
            final = step_dir(Path(d, "train", "checkpoints"), row["steps"])
            if not (final / "meta.json").is_file():  # a trainer stopped early by a signal exits 0 too
                raise MLCDError(f"{row['row']} seed {seed}: training ended before step {row['steps']}; rerun to resume")
            self.in_process(threads, export_fn, str(final), export)
            commands.append(shown(export_fn, str(final), export))
            spec = "mlcd:" + export
        pkw = self.probe_kwargs(os.path.join(d, "probe"))
        # a process of its own, like a training: two probes run side by side under --jobs 2 (in this
        # process they ran one at a time, and a lane idled whenever both runs were probing)
        cmd = self.probe_cmd(spec, pkw)
        self._sub(cmd, os.path.join(d, "probe.log"), threads)
        pr = load_json(pkw["json"], expect=dict)
        try:
            pr["linear"]["top1"], pr["knn"]["top1"], pr["linear"]["l2"], pr["n_train"], pr["n_test"]
        except (KeyError, TypeError):
            raise MLCDError(f"{pkw['json']}: not a probe result (linear / knn / n_train / n_test missing); "
                            f"delete {pkw['out']} and rerun") from None
        commands.append(shlex.join(cmd))
        res = {**row, "linear_top1": pr["linear"]["top1"], "knn_top1": pr["knn"]["top1"], "l2": pr["linear"]["l2"],
               "n_probe_train": pr["n_train"], "n_probe_test": pr["n_test"], "seed": seed,
               "batch_size": a.batch_size if row["kind"] == "train" else None,
               "train_seconds": None if train_s is None else round(train_s, 1),
               "seconds": round(time.perf_counter() - t0, 1), "commands": commands, "budget": self.budget(row)}
        if row["kind"] == "train":
            from mlcd_train.demo import read_metrics

            recs = read_metrics(os.path.join(d, "train", "metrics.jsonl"))
            if recs:
                res["final_loss"] = recs[-1]["loss"]
                res["img_per_s"] = recs[-1].get("img_per_s")
        atomic_save_json(res_path, res)
        log(f"{row['row']} seed {seed}: linear {100 * res['linear_top1']:.2f}%  20-NN {100 * res['knn_top1']:.2f}%")
        return res

    # ------------------------------------------------------------------ report
    @staticmethod
    def aggregate(runs: list[dict]) -> dict:
        import statistics

        out = {"row": runs[0]["row"], "n": len(runs), "seeds": [r["seed"] for r in runs]}
        for key in ("linear_top1", "knn_top1"):
            xs = [100 * r[key] for r in runs]
            out[key] = statistics.fmean(xs)
            out[key + "_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        for key in ("loss", "k", "l", "r", "model", "steps", "set"):
            if key in runs[0]:
                out[key] = runs[0][key]
        return out

    def report(self, agg: list[dict]) -> str:
        lines = ["| row | student | loss | k | l | r | steps | extra settings | seeds | linear top-1 | 20-NN top-1 |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in agg:
            extra = " ".join(r.get("set") or []) or "-"
            lines.append(f"| {r['row']} | {r.get('model', '-')} | {r.get('loss', '-')} | {r.get('k', '-')} | "
                         f"{r.get('l', '-')} | {r.get('r', '-')} | {r.get('steps', '-')} | {extra} | {r['n']} | "
                         f"{r['linear_top1']:.2f} ± {r['linear_top1_std']:.2f} | "
                         f"{r['knn_top1']:.2f} ± {r['knn_top1_std']:.2f} |")
        return "\n".join(lines)

    def plot(self, agg: list[dict]) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from mlcd_core.io import atomic_open

        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(agg)), 4))
        names = [r["row"] for r in agg]
        xs = range(len(agg))
        lin = [r["linear_top1"] for r in agg]
        knn = [r["knn_top1"] for r in agg]
        ax.bar([x - 0.2 for x in xs], lin, width=0.4, yerr=[r["linear_top1_std"] for r in agg], label="linear probe")
        ax.bar([x + 0.2 for x in xs], knn, width=0.4, yerr=[r["knn_top1_std"] for r in agg], label="20-NN")
        for x, v in zip(xs, lin):
            ax.text(x - 0.2, v + 0.3, f"{v:.1f}", ha="center", fontsize=7)
        teacher = [r for r in agg if r["row"] == "teacher"]
        if teacher:
            ax.axhline(teacher[0]["linear_top1"], ls="--", color="grey", lw=1, label="teacher (linear)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        lo = min(lin + knn)
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_ylabel("top-1 on the 10k test images (%)")
        ax.set_title("Fashion-MNIST, pca teacher: students (mean ± std over seeds)")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = self.p("results.png")
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        return path

    def run(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        a = self.a
        t0 = time.perf_counter()
        rows = self.rows()  # a bad --rows is refused before minutes of preparation
        self.prepare(rows)
        log(f"prepared shards, teacher embeddings, clusters and labels in {time.perf_counter() - t0:.0f}s")
        tasks = [(r, s) for r in rows for s in ([a.seed] if r["kind"] == "teacher" else a.seeds)]
        # the longest trainings first, so that the --jobs pool ends together; the probe-only rows
        # (teacher, random init: a random tower's probe takes longer than a 1-epoch row's training)
        # before the short trainings
        first = sorted((t for t in tasks if "after" not in t[0]),
                       key=lambda t: -(t[0]["steps"] if t[0]["kind"] == "train" else a.steps + 1))
        later = [t for t in tasks if "after" in t[0]]
        threads = 1 if a.jobs > 1 else a.threads
        results: dict = {}
        for phase in (first, later):
            pool = ThreadPoolExecutor(max_workers=a.jobs)
            try:
                futs = [(t, pool.submit(self.run_one, t[0], t[1], threads)) for t in phase]
                for (row, seed), f in futs:
                    results[(row["row"], seed)] = f.result()
                    self.save(rows, results, t0)
            finally:  # a failure (or Ctrl-C) starts no further run
                pool.shutdown(wait=True, cancel_futures=True)
        agg = self.save(rows, results, t0)
        path = self.plot(agg)
        print(self.report(agg))
        print(f"results: {self.p('results.json')}, {self.p('results.md')}, plot {path}")
        return 0

    def save(self, rows, results, t0) -> list[dict]:
        agg = []
        for row in rows:
            runs = [v for (name, _), v in sorted(results.items(), key=lambda kv: kv[0][1]) if name == row["row"]]
            if runs:
                agg.append(self.aggregate(runs))
        table = self.report(agg)
        atomic_save_json(self.p("results.json"), {"settings": vars(self.a), "seconds": round(time.perf_counter() - t0),
                                                  "rows": agg, "runs": list(results.values())})
        atomic_write_text(self.p("results.md"), table + "\n")
        return agg


def build_parser() -> argparse.ArgumentParser:
    from mlcd_core.args import int_at_least

    k_int = int_at_least(2)  # a clustering needs two centres at least
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/repro_fashion_mnist", help="working folder (resumable)")
    p.add_argument("--idx-dir", default=None, help="folder with the four Fashion-MNIST IDX .gz files "
                                                   "(default: the Debian package's)")
    p.add_argument("--gpu", action="store_true", help="GPU-sized budgets (30 epochs a row, best 60), cuda")
    p.add_argument("--rows", default="main", help="main | full | comma-separated row names")
    p.add_argument("--seeds", default="0,1,2", help="training seeds per row (default 0,1,2)")
    p.add_argument("--k-list", default="100,1000,5000", help="cluster counts for Unicom vs MLCD (--rows full)")
    p.add_argument("--l-list", default="1,2,4,8,16", help="MLCD positives swept at --k-main (--rows full)")
    p.add_argument("--k-main", type=k_int, default=1000, help="k of the main rows and the l sweep")
    p.add_argument("--k-rate", type=k_int, default=5000, help="k of the sample-rate comparison (r matters only "
                                                          "when k is much larger than the positives of a batch)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps of a row (CPU default 469: 1 epoch)")
    p.add_argument("--best-steps", type=positive_int, default=None,
                   help="steps of the best rows (CPU default 1407: 3 epochs)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch (default 128)")
    p.add_argument("--model", default=STUDENT, help=f"student preset (default {STUDENT})")
    p.add_argument("--best-model", default=BEST_MODEL, help=f"student of the best rows and of random_init "
                                                            f"(default {BEST_MODEL})")
    p.add_argument("--model-overrides", default="{}", help="YAML dict of model overrides")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="trainer override for every trained row (repeatable)")
    p.add_argument("--best-set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"extra overrides of the best rows (default {' '.join(BEST_SET) or 'none'})")
    p.add_argument("--cpu-bf16", default="auto", choices=("auto", "on", "off"),
                   help="train with bf16 autocast on the CPU (train.cpu_autocast) and channels_last images; "
                        "auto: on the CPU when it has native bf16 (AVX512-BF16 or AMX); about 1.8x a step. "
                        "A --set or --best-set of train.precision or train.cpu_autocast takes precedence")
    p.add_argument("--nproc", type=positive_int, default=1, help="training ranks per run (torchrun when > 1)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="runs trained at the same time (one thread each when > 1)")
    p.add_argument("--threads", type=positive_int, default=2, help="OMP threads of a run when --jobs 1")
    p.add_argument("--workers", type=nonneg_int, default=1, help="DataLoader workers per training run")
    p.add_argument("--probe-train-shards", type=positive_int, default=None,
                   help="fit the probe on the first training shard (10k images) instead of all 60k")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"),
                   help="cpu | cuda | auto (default cpu; --gpu: cuda)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the clustering (and of the teacher row)")
    return p


def int_list(option: str, text: str, low: int, high: int | None = None) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4], distinct integers in [``low``, ``high``]; else an MLCDError
    naming ``option`` (a value twice would train two runs into one folder)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise MLCDError(f"{option}: comma-separated integers expected, got {text[:80]!r}") from None
    bad = [v for v in values if v < low or (high is not None and v > high)]
    if bad:
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise MLCDError(f"{option}: every value must be an integer {span}, got {str(bad[0])[:40]}")
    if len(set(values)) != len(values):
        raise MLCDError(f"{option}: a value appears twice in {text[:80]!r}")
    return values


def main(argv=None) -> int:
    """The command; bad input is one line naming the option or file, exit status 2."""
    a = build_parser().parse_args(argv)
    try:
        return Repro(settings(a)).run()
    except MLCDError as exc:
        print(f"reproduce_fashion_mnist: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be made or written (read-only, full, a file in the way)
        print(f"reproduce_fashion_mnist: error: {exc.filename or a.work}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def settings(a: argparse.Namespace) -> argparse.Namespace:
    """The parsed options checked (lists, YAML, folders) and their defaults filled in, before
    anything is written; an MLCDError names the option at fault."""
    import yaml

    a.k_list = int_list("--k-list", a.k_list, 2)
    a.l_list = int_list("--l-list", a.l_list, 1)
    a.seeds = int_list("--seeds", a.seeds, 0, SEED_MAX)
    if a.probe_train_shards not in (None, 1):
        raise MLCDError("--probe-train-shards: use 1 (the first 10k images), or leave it out (all 60k)")
    try:
        overrides = yaml.safe_load(a.model_overrides)
    except yaml.YAMLError as exc:
        raise MLCDError(f"--model-overrides: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(overrides, dict):
        raise MLCDError(f"--model-overrides: expected a YAML mapping such as '{{width: 64}}', "
                        f"got {a.model_overrides!r}")
    if a.idx_dir:  # the shards, embeddings and runs go to --work, never among the IDX files read
        if not os.path.isdir(a.idx_dir):
            raise MLCDError(f"--idx-dir {a.idx_dir}: not a folder (it holds the four Fashion-MNIST IDX .gz files)")
        check_out_separate("--work", a.work, [("--idx-dir", a.idx_dir)], recursive=("--idx-dir",))
        work, idx = Path(a.work).resolve(), Path(a.idx_dir).resolve()
        if idx == work or work in idx.parents:  # the stages write all over --work
            raise MLCDError(f"--idx-dir {a.idx_dir}: inside --work {a.work}, which the stages write into; "
                            "keep the IDX files elsewhere")
    if os.path.exists(a.work) and not os.path.isdir(a.work):
        raise MLCDError(f"--work {a.work}: exists and is not a folder")
    a.best_set = a.best_set if a.best_set is not None else list(BEST_SET)
    a.batch_size = a.batch_size or 128
    if a.gpu:
        a.steps = a.steps or 14063          # 30 epochs at batch 128
        a.best_steps = a.best_steps or 28125
        a.device = a.device or "cuda"
        a.workers = max(a.workers, 6)
        a.jobs = 1
    else:
        a.steps = a.steps or 469            # 1 epoch at batch 128
        a.best_steps = a.best_steps or 1407  # 3 epochs
        a.device = a.device or "cpu"
    # the trainer's speed settings go first in every row's overrides, so --set can still change them
    if a.cpu_bf16 == "auto":
        import torch

        from mlcd_train.train import cpu_has_fast_bf16

        on_cpu = a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available())
        a.cpu_bf16 = "on" if on_cpu and cpu_has_fast_bf16() else "off"
    own = {kv.split("=", 1)[0].strip() for kv in list(a.set or []) + list(a.best_set or [])}
    speed = []
    if a.cpu_bf16 == "on":  # a precision the user sets is not contradicted (cpu_autocast needs bf16)
        if not own & {"train.precision", "train.cpu_autocast"}:
            speed += ["train.precision=bf16", "train.cpu_autocast=true"]
        speed.append("train.channels_last=true")
    a.set = speed + list(a.set or [])
    return a


if __name__ == "__main__":
    sys.exit(main())
