"""``mlcd demo``: the whole MLCD pipeline end to end on the shipped Fashion-MNIST sample.

    mlcd demo --out demo_out                 # about 5-10 minutes on 2 CPU cores
    mlcd demo --out demo_out --quick         # a few dozen steps, about a minute or two

Stages (each one is the real ``mlcd`` stage, run with the arguments printed in the log):

  1. shards   the sample's train (3000 images) and test (1000) splits -> WebDataset shards
  2. embed    the teacher: ``pca`` (pixels PCA-whitened to 64 dims), fitted on the train split
  3. cluster  spherical k-means of the teacher embeddings (k centres, faiss)
  4. assign   each image's top-l centres (l = 8) are its labels
  5. train    a tiny ViT (ViT-Tiny-4-28) with the MLCD loss and PartialFC on 2 ranks under
              torchrun (gloo on CPU): ``python -m torch.distributed.run --nproc_per_node 2
              -m mlcd_train.train --config fashion_mnist_sample ...``
  6. export   the student's backbone -> native ``student.pt`` + ``student.json``
  7. convert  -> a Hugging Face directory (``MLCDVisionModel`` / ``CLIPVisionModel``), which
              ``mlcd convert`` reloads and compares; the demo reloads it once more with
              ``transformers`` and compares it with the native model on real test images; any
              difference stops the demo with an error
  8. probe    linear probe + 20-NN on the test split for the student (through the Hugging Face
              directory), a randomly initialised student of the same shape, and the teacher

Everything lands in ``--out``: ``shards/``, ``emb/``, ``clusters/``, ``labels/``, ``train/``
(config, metrics.jsonl, tensorboard logs in ``train/tb``, checkpoints), ``export/``, ``hf/``,
``probe/``, ``loss_curve.png``, ``summary.json`` and ``logs/``.  Rerunning with the same
``--out`` resumes: finished stages are skipped (training continues from its last checkpoint).
Exit status 0 when every stage succeeded; a missing or failing stage stops the demo with a
message naming it and a non-zero status.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlcd_train.utils.errors import MLCDError

# module -> stage that provides it
REQUIRED_MODULES = {
    "mlcd_train.data.shards": "shards", "mlcd_train.data.reader": "reader", "clustering.embed": "embed",
    "clustering.embedders": "embedders", "clustering.kmeans": "cluster", "clustering.assign": "assign",
    "mlcd_train.train": "train", "mlcd_train.export": "export", "mlcd_train.convert": "convert",
    "mlcd_train.probe": "probe",
}
CONFIG = "fashion_mnist_sample"


def missing_parts() -> list[str]:
    """What the demo needs and cannot find (modules of other stages, the training preset)."""
    missing = []
    for mod, stage in REQUIRED_MODULES.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"stage {stage!r} ({mod})")
    from mlcd_train.config import CONFIGS_DIR

    if not (CONFIGS_DIR / f"{CONFIG}.yaml").is_file():
        missing.append(f"training preset configs/{CONFIG}.yaml")
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.rows: list[dict] = []
        self.logs = self.out / "logs"

    # ------------------------------------------------------------------ helpers
    def p(self, *parts) -> str:
        return str(self.out.joinpath(*parts))

    def say(self, msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    def call(self, stage: str, module: str, argv: list[str]) -> None:
        """Run ``module.main(argv)`` in this process; any failure names the stage."""
        self.say(f"mlcd {stage} {' '.join(argv)}")
        mod = importlib.import_module(module)
        rc = mod.main(argv)
        if rc:
            raise MLCDError(f"mlcd {stage} exited with status {rc}")

    def run_stage(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        self.say(f"--- {name}")
        try:
            figure = fn()
        except MLCDError as exc:
            raise MLCDError(f"stage {name}: {exc}") from None
        dt = time.perf_counter() - t0
        self.rows.append({"stage": name, "seconds": round(dt, 1), "result": figure})
        self.say(f"--- {name} done in {dt:.1f}s: {figure}")

    # ------------------------------------------------------------------ stages
    def subset(self, split: str, n: int) -> str:
        """The first ``n`` images of the sample's ``split`` as IDX files (classes are mixed in IDX order)."""
        import shutil

        from mlcd_train.data.sample import SAMPLE_DIR, sample_paths
        from mlcd_train.data.shards import idx_bytes, read_idx
        from mlcd_train.utils.io import atomic_write_bytes

        images, labels = sample_paths(split)
        d = self.out / "sample_subset"
        stem = "train" if split == "train" else "t10k"
        img = d / f"{stem}-images-idx3-ubyte.gz"
        atomic_write_bytes(img, idx_bytes(read_idx(images)[:n]))
        atomic_write_bytes(d / f"{stem}-labels-idx1-ubyte.gz", idx_bytes(read_idx(labels)[:n]))
        shutil.copy(SAMPLE_DIR / "classes.json", d / "classes.json")
        return str(img)

    def shards(self) -> str:
        sizes = []
        limits = {"train": self.args.train_images, "test": self.args.test_images}
        for split, src in (("train", "sample"), ("test", "sample:test")):
            if limits[split]:
                src = self.subset(split, limits[split])
            out = self.p("shards", split)
            if not (Path(out) / "sizes.json").exists():
                self.call("shards", "mlcd_train.data.shards", ["--input", src, "--out", out, "--shard-size", "500"])
            sizes.append(sum(json.loads((Path(out) / "sizes.json").read_text()).values()))
        return f"{sizes[0]} train / {sizes[1]} test images"

    def embed(self) -> str:
        self.call("embed", "clustering.embed", ["--shards", self.p("shards", "train"), "--out", self.p("emb"),
                                               "--model", "pca", "--dim", str(self.args.pca_dim),
                                               "--image-size", "28", "--workers", "0"])
        meta = json.loads(Path(self.p("emb", "meta.json")).read_text())
        return f"{meta['total']} x {meta['dim']} ({meta['embedder']})"

    def cluster(self) -> str:
        self.call("cluster", "clustering.kmeans", ["--emb", self.p("emb"), "--k", str(self.args.k),
                                                  "--out", self.p("clusters"), "--seed", str(self.args.seed),
                                                  "--threads", "2"])
        meta = json.loads(Path(self.p("clusters", "meta.json")).read_text())
        return f"k = {meta.get('k', self.args.k)}, {meta.get('iterations', '?')} iterations"

    def assign(self) -> str:
        self.call("assign", "clustering.assign", ["--emb", self.p("emb"), "--centroids",
                                                 self.p("clusters", "centroids.npy"), "--topk", str(self.args.l),
                                                 "--out", self.p("labels"), "--threads", "2"])
        stats_path = Path(self.p("labels", "stats.json"))
        if stats_path.exists():
            stats = json.loads(stats_path.read_text())
            purity = _find(stats, "purity")
            if isinstance(purity, (int, float)):
                return f"top-{self.args.l} labels, top-1 cluster purity {100 * purity:.1f}%"
        return f"top-{self.args.l} labels"

    def train_cmd(self) -> list[str]:
        a = self.args
        overrides = [f"output_dir={self.p('train')}", f"seed={a.seed}", f"data.shards={self.p('shards', 'train')}",
                     f"data.labels={self.p('labels')}", f"train.steps={a.steps}", f"loss.l={a.l}",
                     f"train.save_every={a.steps}", f"train.log_every={max(1, min(10, a.steps // 20))}",
                     "train.device=cpu", "data.num_workers=1"]
        if a.batch_size:
            overrides.append(f"train.global_batch_size={a.batch_size}")
        if a.warmup is not None:
            overrides.append(f"optim.warmup_steps={a.warmup}")
        overrides += a.set or []
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(a.nproc),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        if a.nproc == 1:
            launch = [sys.executable]
        return launch + ["-m", "mlcd_train.train", "--config", CONFIG] + overrides

    def steps(self) -> int:
        """Training steps in effect: --steps, unless a --set train.steps=N comes after it."""
        n = self.args.steps
        for kv in self.args.set or []:
            key, _, value = kv.partition("=")
            if key.strip() == "train.steps" and value.strip().isdigit():
                n = int(value)
        return n

    def train(self) -> str:
        done = Path(self.p("train", "checkpoints", f"step_{self.steps():08d}", "meta.json"))
        if done.exists():
            self.say(f"training already finished ({done.parent}); not relaunching torchrun")
            return self._train_figure()
        cmd = self.train_cmd()
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / "train.log"
        self.say(" ".join(cmd) + f"   (log: {log_path})")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            for line in proc.stdout:
                log.write(line)
                if not self.args.quiet_train:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
            rc = proc.wait()
        if rc:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise MLCDError(f"torchrun exited with status {rc}; see {log_path}:\n" + "\n".join(tail))
        return self._train_figure()

    def _train_figure(self) -> str:
        recs = read_metrics(self.p("train", "metrics.jsonl"))
        if not recs:
            raise MLCDError(f"{self.p('train', 'metrics.jsonl')} has no records")
        first, last = recs[0], recs[-1]
        return (f"{last['step']} steps x {self.args.nproc} ranks, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
                f"{last.get('img_per_s', float('nan')):.0f} img/s")

    def export(self) -> str:
        self.call("export", "mlcd_train.export", ["--checkpoint", self.p("train"), "--out",
                                                 self.p("export", "student.pt")])
        side = json.loads(Path(self.p("export", "student.json")).read_text())
        cfg = side["model_config"]
        # a student of the same shape at its random initialisation: the probe's floor
        import torch

        from mlcd_train.export import save_native
        from mlcd_train.models import create_model_from_config

        torch.manual_seed(self.args.seed)
        rand = create_model_from_config(cfg)
        save_native(rand.state_dict(), cfg, self.p("export", "random_init.pt"), source="random init")
        return f"{cfg['name']} step {side['step']} -> export/student.pt"

    def convert(self) -> str:
        self.call("convert", "mlcd_train.convert", ["--checkpoint_path", self.p("export", "student.pt"),
                                                   "--pytorch_dump_folder_path", self.p("hf"), "--overwrite"])
        report = check_hf_reload(self.p("export", "student.pt"), self.p("hf"), self.p("shards", "test"))
        return (f"{report['hf_class']} reloaded, pooled max rel diff {report['pooled_max_rel_diff']:.1e} "
                f"on {report['images']} test images")

    def probe(self, name: str, spec: str, fresh: bool) -> str:
        a = self.args
        js = self.p("probe", f"{name}.json")
        argv = ["--embedder", spec, "--train", self.p("shards", "train"), "--test", self.p("shards", "test"),
                "--out", self.p("probe"), "--json", js, "--workers", "0"]
        if fresh:
            argv.append("--overwrite-features")
        if a.quick:
            argv += ["--l2-grid", "1e-4,1e-2,1", "--max-iter", "200"]
        self.call("probe", "mlcd_train.probe", argv)
        res = json.loads(Path(js).read_text())
        self.probes[name] = res
        return f"linear {100 * res['linear']['top1']:.1f}%, 20-NN {100 * res['knn']['top1']:.1f}%"

    def settings(self) -> dict:
        a = self.args
        return {"k": a.k, "l": a.l, "steps": a.steps, "batch_size": a.batch_size, "warmup": a.warmup,
                "nproc": a.nproc, "pca_dim": a.pca_dim, "seed": a.seed, "set": a.set or [], "config": CONFIG,
                "train_images": a.train_images, "test_images": a.test_images}

    def check_settings(self) -> None:
        """A rerun resumes only the same run: other settings in the same folder are refused."""
        from mlcd_train.utils.io import atomic_save_json, load_json

        path = self.out / "demo_settings.json"
        if path.exists():
            old = load_json(path)
            if old != self.settings():
                diff = {k: (old.get(k), v) for k, v in self.settings().items() if old.get(k) != v}
                raise MLCDError(f"{path}: {self.out} holds a demo run with other settings {diff} "
                                f"(old, new); use another --out")
        else:
            atomic_save_json(path, self.settings())

    # ------------------------------------------------------------------ driver
    def run(self) -> int:
        missing = missing_parts()
        if missing:
            print("mlcd demo: cannot run, these parts of the pipeline are not built yet:\n  "
                  + "\n  ".join(missing), file=sys.stderr)
            return 3
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        self.probes: dict = {}
        t0 = time.perf_counter()
        self.run_stage("shards", self.shards)
        self.run_stage("embed (pca teacher)", self.embed)
        self.run_stage("cluster", self.cluster)
        self.run_stage("assign", self.assign)
        self.run_stage(f"train ({self.args.nproc} ranks)", self.train)
        self.run_stage("export", self.export)
        self.run_stage("convert + HF reload", self.convert)
        self.run_stage("probe student (HF)", lambda: self.probe("student", "hf:" + self.p("hf"), True))
        if not self.args.quick:
            self.run_stage("probe random-init student", lambda: self.probe(
                "random_init", "mlcd:" + self.p("export", "random_init.pt"), True))
        self.run_stage("probe teacher (pca)", lambda: self.probe(
            "teacher", "pca:" + self.p("emb", "pca.npz"), False))
        plot = plot_loss_curve(self.p("train", "metrics.jsonl"), self.p("loss_curve.png"))
        total = time.perf_counter() - t0
        from mlcd_train.utils.io import atomic_save_json

        atomic_save_json(self.p("summary.json"), {
            "seconds": round(total, 1), "stages": self.rows, "probe": self.probes,
            "settings": self.settings(),
            "train_command": self.train_cmd()})
        print(format_rows(self.rows, total))
        print(f"\nartefacts in {self.out}: loss curve {plot}, summary {self.p('summary.json')}")
        print(f"tensorboard logs: tensorboard --logdir {self.p('train', 'tb')}")
        return 0


def _find(obj, key):
    """First value of ``key`` anywhere in a nested dict."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            got = _find(v, key)
            if got is not None:
                return got
    return None


def read_metrics(path) -> list[dict]:
    """Records of a trainer metrics.jsonl, one per step (the last one wins after a resume)."""
    by_step = {}
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if "step" in rec and "loss" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(metrics_path, png_path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlcd_train.utils.io import atomic_open

    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], marker=".", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("MLCD training loss (mean over ranks)")
    if recs and "lr" in recs[0]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="tab:orange", alpha=0.5, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return str(png_path)


def check_hf_reload(native_pt: str, hf_dir: str, test_shards: str, n_images: int = 32) -> dict:
    """Reload ``hf_dir`` with transformers and compare it with the native export on real images.

    Every hidden state's class token and the pooled output must agree (``mlcd convert``'s
    tolerances); otherwise an MLCDError says where they diverge.
    """
    import torch
    import transformers

    from clustering.embedders import clip_transform
    from mlcd_train import convert
    from mlcd_train.data.reader import ShardDataset
    from mlcd_train.export import load_model

    model = load_model(native_pt).float().eval()
    cfg_path = Path(hf_dir) / "config.json"
    if not cfg_path.is_file():
        raise MLCDError(f"{hf_dir}: no config.json; the conversion did not write a Hugging Face directory")
    arch = (json.loads(cfg_path.read_text()).get("architectures") or ["AutoModel"])[0]
    hf_cls = getattr(transformers, arch, transformers.AutoModel)
    try:
        hf_model = hf_cls.from_pretrained(hf_dir, local_files_only=True).float().eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise MLCDError(f"{hf_dir}: transformers cannot reload the converted model ({exc})") from None
    tf = clip_transform(int(model.config.image_size))
    images = []
    for s in ShardDataset(test_shards, transform=tf):
        images.append(s.image)
        if len(images) == n_images:
            break
    pixels = torch.stack(images)
    with torch.no_grad():
        ours = model.forward_hidden_states(pixels)
        ours_pooled = model._pool(ours[-1])
        hf_states, hf_pooled = convert._hf_outputs(hf_model, pixels, model.proj is not None)
    if model.proj is not None and model.config.pos_embed == "rope2d":
        hf_pooled = hf_pooled @ model.proj
    checks = convert.compare_outputs(ours, ours_pooled, hf_states, hf_pooled,
                                     f"{hf_dir} reloaded with transformers vs {native_pt}")
    return {"hf_class": type(hf_model).__name__, "images": len(images), **checks}


def format_rows(rows: list[dict], total: float) -> str:
    w = max(len("stage"), *(len(r["stage"]) for r in rows))
    lines = [f"{'stage'.ljust(w)}  {'time':>8}  result", f"{'-' * w}  {'-' * 8}  {'-' * 40}"]
    lines += [f"{r['stage'].ljust(w)}  {r['seconds']:>7.1f}s  {r['result']}" for r in rows]
    lines.append(f"{'total'.ljust(w)}  {total:>7.1f}s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; a rerun resumes)")
    p.add_argument("--k", type=int, default=None, help="clusters (default 200; --quick 50)")
    p.add_argument("--l", type=int, default=8, help="labels (positive centres) per image (default 8)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300; --quick 40)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size over the ranks (default: the preset's 128; --quick 64)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(100, steps/5))")
    p.add_argument("--nproc", type=int, default=2, help="training ranks under torchrun (default 2; 1: no torchrun)")
    p.add_argument("--pca-dim", type=int, default=64, help="teacher dimension (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=None,
                   help="use only the first N of the sample's 3000 training images (smoke tests)")
    p.add_argument("--test-images", type=int, default=None,
                   help="use only the first N of the sample's 1000 test images (smoke tests)")
    p.add_argument("--quick", action="store_true",
                   help="reduced setting for a smoke run: 40 steps, k 50, batch 64, smaller probe sweep, "
                        "no random-init baseline")
    p.add_argument("--quiet-train", action="store_true", help="keep the trainer's output in logs/train.log only")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra trainer config override (repeatable), e.g. --set loss.name=unicom")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.k is None:
        args.k = 50 if args.quick else 200
    if args.steps is None:
        args.steps = 40 if args.quick else 300
    if args.batch_size is None and args.quick:
        args.batch_size = 64
    if args.warmup is None:
        args.warmup = max(1, min(100, args.steps // 5))
    if min(args.steps, args.nproc, args.l, args.k) < 1:  # before demo_settings.json pins the folder
        raise MLCDError(f"--steps, --nproc, --l and --k must be positive (got {args.steps}, {args.nproc}, "
                        f"{args.l}, {args.k})")
    if args.l > args.k:
        raise MLCDError(f"--l {args.l} exceeds --k {args.k}")
    return Demo(args).run()


if __name__ == "__main__":
    from mlcd_train.cli import run_stage

    sys.exit(run_stage("demo", sys.argv[1:]))
