"""``mlcd demo``: ``mlcd pipeline`` end to end on the shipped Fashion-MNIST sample, plus baselines.

    mlcd demo --out demo_out                 # about 4 minutes on 2 CPU cores
    mlcd demo --out demo_out --quick         # a few dozen steps
    mlcd demo --out demo_out --model ViT-Tiny-4-28 --rounds 2

The demo builds a pipeline config for the sample (``OUT/pipeline_config.yaml``, the same file
``mlcd pipeline --config`` takes) and runs it (mlcd_train/pipeline.py):

  1. shards   the sample's train (3000 images) and test (1000) splits -> ``shards/``
  2. embed    round 1's teacher: ``pca`` (pixels PCA-whitened to 64 dims) -> ``round_1/emb``
  3. cluster  spherical k-means of the teacher embeddings (k centres) -> ``round_1/clusters``
  4. assign   each image's top-l centres are its labels -> ``round_1/labels``
  5. train    the student (default in DEMO_DEFAULTS below) with the MLCD loss and PartialFC on
              2 gloo ranks under torchrun, with a 20-NN evaluation on the test split every
              steps/5 steps -> ``round_1/train``
  6. export   the student's backbone -> ``round_1/export/student.pt`` + ``.json``
  7. probe    linear probe + 20-NN of the student on the test split -> ``round_1/probe``
  with ``--rounds N``, round R+1 repeats 2-7 with round R's student as the teacher.

Then the demo's extras: the same probe for a randomly initialised student of the same shape
and for the teacher (``baselines/``); for a ViT student the last round's export is converted to
a Hugging Face directory (``hf/``), reloaded with ``transformers`` and compared with the native
model on real test images (any difference stops the demo).  The summary: a table (stage, time,
key figure), ``summary.json``, ``loss_curve.png``, ``knn_curve.png`` (the in-training k-NN) and
``probe_bars.png`` (student, teacher and random init side by side).  Rerunning with the same
``--out`` resumes: finished stages are skipped; the conversion check is redone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlcd_train.pipeline import (Pipeline, format_rows, plot_probe_bars, read_eval, read_metrics, read_probe_result,
                                  validate)
from mlcd_core.args import nonneg_int, positive_int
from mlcd_core.errors import MLCDError

__all__ = ["DEMO_DEFAULTS", "main", "read_metrics", "read_eval"]

# The demo's recipe, in one place.  "overrides" are trainer key=value pairs applied after the
# preset and the settings below (and before --set).
DEMO_DEFAULTS = {
    # measured on the sample (docs/reproduction.md, "The demo's recipe"): ResNet-18-w16-28 at
    # AdamW lr 1e-3 needed 900 steps (over 10 minutes on 2 cores) to pass its teacher's linear
    # probe; ResNet-10-w16-28 (about 1.5x the images a second) at lr 1e-2 passes it in 600
    # steps: 83.4 / 82.7 / 83.4 % on three runs against 81.2-81.3 %
    "config": "fashion_mnist_sample",   # trainer preset
    "model": "ResNet-10-w16-28",        # student preset (mlcd_train.models.list_models())
    "k": 200,                           # clusters
    "l": 8,                             # labels per image
    "steps": 600,
    "batch_size": 128,                  # global batch over the ranks
    "warmup": 60,                       # None: min(100, steps // 5)
    "eval_fraction": 5,                 # in-training k-NN every steps // eval_fraction steps (0: off)
    "pca_dim": 64,                      # teacher dimension
    "nproc": 2,
    "rounds": 1,
    "overrides": ["optim.lr=1e-2", "data.aug.rand_augment=2", "data.aug.color_jitter=0.4",
                  "data.aug.random_erasing=0.25", "model.drop_path=0.1"],
}
# --quick replaces these
DEMO_QUICK = {"k": 50, "steps": 40, "batch_size": 64}


def sample_subset(split: str, n: int, folder, write: bool = True) -> str:
    """The first ``n`` images of the sample's ``split`` as IDX files in ``folder`` (classes are mixed in IDX
    order); returns the images file.  Files already there are kept (``write=False``: only the path)."""
    from mlcd_train.data.sample import SAMPLE_DIR, sample_paths
    from mlcd_train.data.shards import idx_bytes, read_idx
    from mlcd_core.io import atomic_write_bytes

    d = Path(folder)
    stem = "train" if split == "train" else "t10k"
    img, lbl = d / f"{stem}-images-idx3-ubyte.gz", d / f"{stem}-labels-idx1-ubyte.gz"
    if write:
        images, labels = sample_paths(split)
        if not lbl.is_file():
            atomic_write_bytes(lbl, idx_bytes(read_idx(labels)[:n]))
        if not img.is_file():
            atomic_write_bytes(img, idx_bytes(read_idx(images)[:n]))
        if not (d / "classes.json").is_file():
            atomic_write_bytes(d / "classes.json", (SAMPLE_DIR / "classes.json").read_bytes())
    return str(img)


def pipeline_config(args, out: Path, write_subsets: bool = False) -> dict:
    """The pipeline config of the demo's settings (validated; inputs are the sample or its subsets,
    written into ``out/sample_subset`` only with ``write_subsets``)."""
    a = args
    inputs = {"train": "sample", "test": "sample:test"}
    for split, n in (("train", a.train_images), ("test", a.test_images)):
        if n:
            inputs[split] = sample_subset(split, n, out / "sample_subset", write=write_subsets)
    overrides = [f"model.name={a.model}", f"train.steps={a.steps}", f"train.global_batch_size={a.batch_size}",
                 f"optim.warmup_steps={a.warmup}", f"train.save_every={a.steps}",
                 f"train.log_every={max(1, min(10, a.steps // 20))}", "train.device=cpu", "data.num_workers=1"]
    overrides += list(DEMO_DEFAULTS["overrides"]) + list(a.set or [])
    probe = {"enabled": True}
    if a.quick:
        probe.update(l2_grid="1e-4,1e-2,1", max_iter=200)
    cfg = {"out": str(out), "input": {**inputs, "shard_size": 500},
           "teacher": {"model": "pca", "dim": a.pca_dim, "image_size": 28},
           "k": a.k, "l": a.l, "rounds": a.rounds,
           "train": {"config": DEMO_DEFAULTS["config"], "overrides": overrides},
           "eval_every": max(1, a.steps // a.eval_fraction) if a.eval_fraction else 0,
           "nproc": a.nproc, "probe": probe, "workers": 0, "threads": 2, "seed": a.seed}
    return validate(cfg, "demo settings")


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()

    def p(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def say(self, msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    def settings(self) -> dict:
        a = self.args
        return {"model": a.model, "k": a.k, "l": a.l, "steps": a.steps, "batch_size": a.batch_size,
                "warmup": a.warmup, "eval_fraction": a.eval_fraction, "nproc": a.nproc, "rounds": a.rounds,
                "pca_dim": a.pca_dim, "seed": a.seed, "set": a.set or [], "config": DEMO_DEFAULTS["config"],
                "overrides": list(DEMO_DEFAULTS["overrides"]), "quick": bool(a.quick),
                "train_images": a.train_images, "test_images": a.test_images}

    def check_settings(self) -> None:
        """A rerun resumes only the same run: other settings in the same folder are refused."""
        from mlcd_core.io import atomic_save_json, load_json

        path = self.out / "demo_settings.json"
        if path.exists():
            old = load_json(path)
            if old != self.settings():
                diff = {k: (old.get(k), v) for k, v in self.settings().items() if old.get(k) != v}
                raise MLCDError(f"{path}: {self.out} holds a demo run with other settings {diff} "
                                f"(old, new); use another --out")
        else:
            atomic_save_json(path, self.settings())

    # ------------------------------------------------------------------ extras
    def random_init(self, pipe: Pipeline) -> None:
        """A student of the same shape at its random initialisation (seeded): the probe's floor."""
        import torch

        from mlcd_train.export import save_native
        from mlcd_train.models import create_model_from_config
        from mlcd_core.io import load_json

        cfg = load_json(pipe.student(1).with_suffix(".json"))["model_config"]
        torch.manual_seed(self.args.seed)
        rand = create_model_from_config(cfg)
        save_native(rand.state_dict(), cfg, self.p("baselines", "random_init.pt"), source="random init")

    def baseline_probe(self, pipe: Pipeline, name: str, spec: str, make=None) -> None:
        """``mlcd probe`` of a baseline into ``baselines/probe/NAME.json`` (skipped when it exists)."""
        js = self.p("baselines", "probe", f"{name}.json")

        def run():
            if make is not None:
                make()
            pipe.probe(spec, self.p("baselines", "probe"), js, fresh=make is not None)

        pipe.stage(f"probe {name.replace('_', ' ')}", lambda: js if js.is_file() else None, run,
                   lambda: _probe_figure(js))
        self.probes[name] = read_probe_result(js)

    def bars(self, last: int) -> dict:
        """Probe results in bar order: earlier rounds' students, the student, the teacher, random init."""
        bars = {f"round {r} student": self.probes[f"round {r} student"] for r in range(1, last)}
        bars["student" if last == 1 else f"round {last} student"] = self.probes["student"]
        bars[f"teacher (pca {self.args.pca_dim})"] = self.probes["teacher"]
        bars["random init"] = self.probes["random_init"]
        return bars

    def convert(self, pipe: Pipeline, rnd: int) -> str:
        """Native -> Hugging Face (``mlcd convert`` checks it), then reloaded with transformers on test images."""
        pt, hf = pipe.student(rnd), self.p("hf")
        from mlcd_train.convert import convert_to_hf

        pipe.call("convert", convert_to_hf, str(pt), str(hf), overwrite=True)
        report = check_hf_reload(str(pt), str(hf), str(pipe.shards_dir("test")))
        self.hf_report = report
        return (f"{report['hf_class']} reloaded, pooled max rel diff {report['pooled_max_rel_diff']:.1e} "
                f"on {report['images']} test images")

    # ------------------------------------------------------------------ driver
    def run(self) -> int:
        import yaml

        from mlcd_train.models.registry import family_of
        from mlcd_core.io import atomic_save_json, atomic_write_text

        a = self.args
        family = family_of(a.model)  # an unknown preset is refused before anything is written
        pipeline_config(a, self.out)  # bad --set keys are refused before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_settings()  # then the subsets: a rerun with other settings leaves the folder alone
        cfg = pipeline_config(a, self.out, write_subsets=True)
        atomic_write_text(self.p("pipeline_config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        pipe = Pipeline(cfg, quiet_train=a.quiet_train, say=self.say)
        pipe.run()
        last = cfg["rounds"]
        self.probes = {"student": pipe.probes[f"round {last} student"]}
        if last > 1:
            self.probes.update({f"round {r} student": pipe.probes[f"round {r} student"] for r in range(1, last)})
        self.baseline_probe(pipe, "teacher", f"pca:{pipe.rdir(1, 'emb', 'pca.npz')}")
        self.baseline_probe(pipe, "random_init", f"mlcd:{self.p('baselines', 'random_init.pt')}",
                            make=lambda: self.random_init(pipe))
        self.hf_report = None
        if family == "vit":
            t1 = time.perf_counter()
            self.say("--- convert + HF reload")
            try:
                figure = self.convert(pipe, last)
            except MLCDError as exc:
                raise MLCDError(f"stage convert: {exc}") from None
            pipe.rows.append({"stage": "convert + HF reload", "seconds": round(time.perf_counter() - t1, 1),
                              "result": figure, "skipped": False})
        metrics = pipe.rdir(last, "train", "metrics.jsonl")
        plots = {"loss_curve": plot_loss_curve(metrics, self.p("loss_curve.png")),
                 "knn_curve": plot_knn_curve({f"round {r}": pipe.rdir(r, "train", "metrics.jsonl")
                                              for r in range(1, last + 1)}, self.p("knn_curve.png"),
                                             {"teacher": self.probes["teacher"],
                                              "random init": self.probes["random_init"]}),
                 "probe_bars": plot_probe_bars(self.bars(last), self.p("probe_bars.png"),
                                               f"{a.model}, {a.steps} steps, k={a.k}, l={a.l}: top-1 on the "
                                               "test split")}
        total = time.perf_counter() - t0
        atomic_save_json(self.p("summary.json"), {
            "seconds": round(total, 1), "stages": pipe.rows, "probe": self.probes, "settings": self.settings(),
            "pipeline_config": cfg, "hf_reload": self.hf_report, "plots": plots,
            "in_training_knn": {f"round {r}": read_eval(pipe.rdir(r, "train", "metrics.jsonl"))
                                for r in range(1, last + 1)}})
        print(format_rows(pipe.rows, total))
        print(f"\nartefacts in {self.out}: {', '.join(Path(v).name for v in plots.values() if v)}, "
              f"summary {self.p('summary.json')}")
        print(f"tensorboard logs: tensorboard --logdir {pipe.rdir(last, 'train', 'tb')}")
        return 0


def _probe_figure(js: Path) -> str:
    res = read_probe_result(js)
    return f"linear {100 * res['linear']['top1']:.1f}%, 20-NN {100 * res['knn']['top1']:.1f}%"


def plot_loss_curve(metrics_path, png_path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlcd_train.pipeline import _save_fig

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
    return _save_fig(fig, png_path)


def plot_knn_curve(metrics_by_round: dict, png_path, refs: dict | None = None) -> str | None:
    """The in-training k-NN top-1 (eval records of metrics.jsonl) per round, with the probe's 20-NN of
    ``refs`` ({name: probe result}) as dashed lines; None when there are no eval records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlcd_train.pipeline import _save_fig

    curves = {name: read_eval(path) for name, path in metrics_by_round.items()}
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, recs in curves.items():
        if recs:
            ax.plot([r["step"] for r in recs], [100 * r["knn_top1"] for r in recs], marker="o", label=name)
    for (name, res), color in zip((refs or {}).items(), ("tab:green", "tab:gray", "tab:red")):
        ax.axhline(100 * res["knn"]["top1"], ls="--", color=color, label=f"{name} (20-NN probe)")
    ax.set_xlabel("step")
    ax.set_ylabel("20-NN top-1 on the test split (%)")
    ax.set_title("k-NN evaluation during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_fig(fig, png_path)


def check_hf_reload(native_pt: str, hf_dir: str, test_shards: str, n_images: int = 32) -> dict:
    """Reload ``hf_dir`` with transformers and compare it with the native export on real images.

    The comparison is ``mlcd convert``'s own (:func:`mlcd_train.convert.verify_against`, its
    tolerances) on ``n_images`` test images instead of random pixels: every hidden state's class
    token and the pooled output must agree; otherwise an MLCDError says where they diverge.
    """
    import torch

    from clustering.embedders import clip_transform
    from mlcd_train import convert
    from mlcd_core.reader import ShardDataset
    from mlcd_train.export import load_model

    model = load_model(native_pt).float().eval()
    if not (Path(hf_dir) / "config.json").is_file():
        raise MLCDError(f"{hf_dir}: no config.json; the conversion did not write a Hugging Face directory")
    # convert's own reload: config.json read checked, safetensors only (nothing unpickled), and a
    # key transformers would fill at random refused
    hf_model = convert.load_hf(hf_dir)
    tf = clip_transform(int(model.config.image_size))
    images = []
    for s in ShardDataset(test_shards, transform=tf):
        images.append(s.image)
        if len(images) == n_images:
            break
    checks = convert.verify_against(model, hf_model, int(model.config.image_size),
                                    f"{hf_dir} reloaded with transformers vs {native_pt}", pixels=torch.stack(images))
    return {"hf_class": type(hf_model).__name__, "images": len(images), **checks}


def build_parser() -> argparse.ArgumentParser:
    d, q = DEMO_DEFAULTS, DEMO_QUICK
    p = argparse.ArgumentParser(prog="mlcd demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; a rerun resumes)")
    p.add_argument("--model", default=d["model"], help=f"student preset (default {d['model']})")
    p.add_argument("--rounds", type=positive_int, default=d["rounds"],
                   help=f"rounds; round R+1's teacher is round R's student (default {d['rounds']})")
    p.add_argument("--k", type=positive_int, default=None, help=f"clusters (default {d['k']}; --quick {q['k']})")
    p.add_argument("--l", type=positive_int, default=d["l"],
                   help=f"labels (positive centres) per image (default {d['l']})")
    p.add_argument("--steps", type=positive_int, default=None, help=f"training steps (default {d['steps']}; "
                                                           f"--quick {q['steps']})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch size over the ranks (default {d['batch_size']}; --quick {q['batch_size']})")
    p.add_argument("--warmup", type=nonneg_int, default=None,
                   help=f"warm-up steps (default {d['warmup']}; runs too short for it: min(100, steps/5))")
    p.add_argument("--eval-fraction", type=nonneg_int, default=d["eval_fraction"],
                   help=f"in-training k-NN every steps/N steps (default N = {d['eval_fraction']}; 0: off)")
    p.add_argument("--nproc", type=positive_int, default=d["nproc"],
                   help=f"training ranks under torchrun (default {d['nproc']}; 1: in this process)")
    p.add_argument("--pca-dim", type=positive_int, default=d["pca_dim"],
                   help=f"teacher dimension (default {d['pca_dim']})")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--train-images", type=positive_int, default=None,
                   help="use only the first N of the sample's 3000 training images (smoke tests)")
    p.add_argument("--test-images", type=positive_int, default=None,
                   help="use only the first N of the sample's 1000 test images (smoke tests)")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced setting for a smoke run: {q['steps']} steps, k {q['k']}, batch {q['batch_size']}, "
                        "smaller probe sweep")
    p.add_argument("--quiet-train", action="store_true", help="keep the trainer's output in logs/ only")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra trainer config override (repeatable), e.g. --set loss.name=unicom")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = {**DEMO_DEFAULTS, **(DEMO_QUICK if args.quick else {})}
    for key in ("k", "steps", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    if args.warmup is None:  # the recipe's warm-up, unless the run is too short for it
        w = base.get("warmup")
        args.warmup = w if w is not None and w < args.steps // 2 else max(1, min(100, args.steps // 5))
    if min(args.steps, args.nproc, args.l, args.k) < 1:  # before demo_settings.json pins the folder
        raise MLCDError(f"--steps, --nproc, --l and --k must be positive (got {args.steps}, {args.nproc}, "
                        f"{args.l}, {args.k})")
    if args.l > args.k:
        raise MLCDError(f"--l {args.l} exceeds --k {args.k}")
    if args.rounds < 1 or args.eval_fraction < 0:
        raise MLCDError(f"--rounds must be >= 1 and --eval-fraction >= 0 (got {args.rounds}, {args.eval_fraction})")
    return Demo(args).run()


if __name__ == "__main__":
    from mlcd_core.stage import run_main
    from mlcd_train import demo as _stage  # the module under its own name, as `mlcd demo` runs it

    sys.exit(run_main("demo", _stage.main, sys.argv[1:]))
