"""``mlcd pipeline --config pipeline.yaml``: every stage on your own corpus, round after round.

    mlcd pipeline --config examples/pipeline_sample.yaml            # the shipped sample
    mlcd pipeline --config my_corpus.yaml --out runs/mine           # --out wins over the YAML's out

Stages, each the real ``mlcd`` stage called in this process (training under torchrun in a
subprocess when ``nproc`` > 1), with the folders a user would give them by hand:

  OUT/shards/train, OUT/shards/test           mlcd shards   (input.train, input.test)
  OUT/round_R/emb                             mlcd embed    (round 1: the teacher; round R > 1:
                                                             mlcd:OUT/round_{R-1}/export/student.pt)
  OUT/round_R/clusters                        mlcd cluster  (k centres)
  OUT/round_R/labels                          mlcd assign   (top-l centres per image)
  OUT/round_R/train                           mlcd train    (trainer preset + overrides, from scratch)
  OUT/round_R/export/student.pt               mlcd export   (the last checkpoint)
  OUT/round_R/probe/student.json              mlcd probe    (linear probe + k-NN on input.test)

Then ``OUT/summary.json`` (every stage's time and figure, every round's probe) and
``OUT/probe_rounds.png``.  A rerun with the same config skips every finished stage (the
file that marks it finished is named in the log) and resumes an unfinished one; raising
``rounds`` adds rounds to a finished run.  Other settings in the same OUT are refused.

The YAML (unknown keys and bad values are refused, one line naming the key)::

    out: runs/pipeline              # optional when --out is given
    input:
      train: sample                 # anything `mlcd shards --input` takes
      test: sample:test             # labelled test split: needed by probe and eval_every
      shard_size: 1000
    teacher:                        # or just `teacher: pca`
      model: pca                    # pca | open_clip:NAME | hf:PATH | mlcd:PATH
      dim: 64                       # pca only
      image_size: 28                # pca only: images resized to S x S
      pretrained: null              # open_clip only: a local checkpoint file
    k: 200                          # clusters
    l: 8                            # labels per image
    rounds: 1                       # round R+1's teacher is round R's student
    train:
      config: fashion_mnist_sample  # a trainer preset or YAML file
      overrides: [model.name=ResNet-18-w16-28, train.steps=300]
    eval_every: 0                   # k-NN on input.test during training every N steps (0: off)
    nproc: 1                        # training ranks: 1 in this process, more under torchrun
    probe: true                     # or {l2_grid: "1e-4,1e-2,1", max_iter: 200}; false: no probe
    workers: 2                      # DataLoader workers of embed and probe
    threads: 0                      # CPU threads of cluster and assign (0: all)
    seed: 0

Relative paths are taken from the current directory, as every other ``mlcd`` command does.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from clustering import assign as A
from clustering import embed as E
from clustering import kmeans as K
from clustering.embedders import embedder_kinds
from mlcd_core.errors import MLCDError
from mlcd_train import export as X
from mlcd_train.trainer.checkpoint import step_dir

REQUIRED = object()

# key -> (type, default); nested mappings are sections
SCHEMA: dict[str, Any] = {
    "out": (str, None),
    "input": {"train": (str, REQUIRED), "test": (str, None), "shard_size": (int, 1000)},
    "teacher": {"model": (str, "pca"), "dim": (int, 64), "image_size": (int, 32), "pretrained": (str, None)},
    "k": (int, REQUIRED),
    "l": (int, 8),
    "rounds": (int, 1),
    "train": {"config": (str, "fashion_mnist_sample"), "overrides": (list, [])},
    "eval_every": (int, 0),
    "nproc": (int, 1),
    "probe": {"enabled": (bool, True), "l2_grid": (str, None), "max_iter": (int, None)},
    "workers": (int, 2),
    "threads": (int, 0),
    "seed": (int, 0),
}


def teacher_spec_ok(spec: str) -> bool:
    """A spec of a registered embedder kind, with the ARG its kind needs (clustering.embedders)."""
    kind, _, arg = spec.partition(":")
    entry = {k.name: k for k in embedder_kinds()}.get(kind)
    return entry is not None and (bool(arg) or entry.missing_arg is None)


# trainer keys whose values the pipeline sets itself (they point at the stages' folders)
OWNED_KEYS = ("output_dir", "data.shards", "data.labels", "eval.train", "eval.test", "eval.every", "resume")
# settings a rerun may change without being another run
FREE_KEYS = ("out", "rounds")


def _all_keys(schema=SCHEMA, prefix="") -> list[str]:
    keys = []
    for name, spec in schema.items():
        keys.append(prefix + name)
        if isinstance(spec, dict):
            keys += _all_keys(spec, prefix + name + ".")
    return keys


def _check_value(key: str, value: Any, tp: type, where: str) -> Any:
    if value is None:
        return None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MLCDError(f"{where}: key {key!r}: expected an integer, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise MLCDError(f"{where}: key {key!r}: expected true or false, got {value!r}")
    elif tp is str:
        if isinstance(value, (dict, list, bool)):
            raise MLCDError(f"{where}: key {key!r}: expected a string, got {value!r}")
        value = str(value)
    elif tp is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MLCDError(f"{where}: key {key!r}: expected a list of key=value strings, got {value!r}")
        value = list(value)
    return value


def _fill(schema: dict, data: dict, prefix: str, where: str) -> dict:
    if not isinstance(data, dict):
        raise MLCDError(f"{where}: key {prefix[:-1]!r}: expected a mapping, got {data!r}")
    for key in data:
        if str(key) not in schema:
            full = prefix + str(key)
            close = difflib.get_close_matches(full, _all_keys(), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MLCDError(f"{where}: key {full!r}: unknown key{hint}")
    out = {}
    for name, spec in schema.items():
        key = prefix + name
        if isinstance(spec, dict):
            out[name] = _fill(spec, data.get(name, {}) if data.get(name) is not None else {}, key + ".", where)
            continue
        tp, default = spec
        if name not in data or data[name] is None:
            if default is REQUIRED:
                raise MLCDError(f"{where}: key {key!r}: required")
            out[name] = list(default) if isinstance(default, list) else default
        else:
            out[name] = _check_value(key, data[name], tp, where)
    return out


def _need(cond: bool, key: str, msg: str, where: str) -> None:
    if not cond:
        raise MLCDError(f"{where}: key {key!r}: {msg}")


def validate(data: Any, where: str = "pipeline config") -> dict:
    """The pipeline config with defaults filled in; an MLCDError names the key at fault."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MLCDError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    if isinstance(data.get("teacher"), str):        # teacher: pca
        data["teacher"] = {"model": data["teacher"]}
    if isinstance(data.get("probe"), bool):         # probe: false
        data["probe"] = {"enabled": data["probe"]}
    if isinstance(data.get("input"), str):          # input: sample
        data["input"] = {"train": data["input"]}
    cfg = _fill(SCHEMA, data, "", where)
    _need(cfg["k"] >= 1, "k", f"must be at least 1, got {cfg['k']}", where)
    _need(1 <= cfg["l"] <= cfg["k"], "l", f"must be in [1, k={cfg['k']}], got {cfg['l']}", where)
    _need(cfg["rounds"] >= 1, "rounds", f"must be at least 1, got {cfg['rounds']}", where)
    _need(cfg["nproc"] >= 1, "nproc", f"must be at least 1, got {cfg['nproc']}", where)
    _need(cfg["eval_every"] >= 0, "eval_every", f"must be >= 0 (0: off), got {cfg['eval_every']}", where)
    _need(cfg["workers"] >= 0, "workers", f"must be >= 0, got {cfg['workers']}", where)
    _need(cfg["threads"] >= 0, "threads", f"must be >= 0, got {cfg['threads']}", where)
    _need(cfg["seed"] >= 0, "seed", f"must be >= 0, got {cfg['seed']}", where)
    _need(bool(cfg["input"]["train"]), "input.train", "must name the training images", where)
    _need(cfg["input"]["shard_size"] >= 1, "input.shard_size", "must be at least 1", where)
    t = cfg["teacher"]
    _need(teacher_spec_ok(t["model"]), "teacher.model",
          f"expected {', '.join(k.usage for k in embedder_kinds())} (the embedder registry), got {t['model']!r}",
          where)
    _need(t["dim"] >= 1 and t["image_size"] >= 1, "teacher.dim", "teacher.dim and teacher.image_size must be >= 1",
          where)
    p = cfg["probe"]
    _need(p["max_iter"] is None or p["max_iter"] >= 1, "probe.max_iter", f"must be >= 1, got {p['max_iter']}", where)
    if p["enabled"]:
        _need(bool(cfg["input"]["test"]), "input.test", "required with probe on (labelled test images); "
              "or set probe: false", where)
    if cfg["eval_every"]:
        _need(bool(cfg["input"]["test"]), "input.test", "required with eval_every > 0", where)
    for text in cfg["train"]["overrides"]:
        key = text.split("=", 1)[0].strip()
        _need("=" in text, "train.overrides", f"{text!r}: expected key=value", where)
        _need(key not in OWNED_KEYS, "train.overrides", f"{key!r} is set by the pipeline (it points at the "
              "stages' folders); leave it out", where)
    trainer_config(cfg, Path("OUT"), 1, where=where)  # the preset exists, the keys and values are valid
    return cfg


def load(path: str | os.PathLike, out: str | None = None) -> dict:
    """Read and validate ``pipeline.yaml``; ``out`` (the command line's --out) wins over the file's."""
    import yaml

    from mlcd_core.io import read_regular

    try:
        data = yaml.safe_load(read_regular(path, 1 << 20, "pipeline config").decode("utf-8"))
    except FileNotFoundError:
        raise MLCDError(f"{path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MLCDError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    cfg = validate(data, str(path))
    if out:
        cfg["out"] = out
    if not cfg["out"]:
        raise MLCDError(f"{path}: key 'out': required (or give --out)")
    return cfg


def trainer_overrides(cfg: dict, out: Path, rnd: int) -> list[str]:
    """The trainer's ``key=value`` list for round ``rnd``: the pipeline's folders, then the user's overrides."""
    r = out / f"round_{rnd}"
    ov = [f"output_dir={r / 'train'}", f"seed={cfg['seed']}", f"data.shards={out / 'shards' / 'train'}",
          f"data.labels={r / 'labels'}", f"loss.l={cfg['l']}"]
    if cfg["eval_every"]:
        ov += [f"eval.every={cfg['eval_every']}", f"eval.train={out / 'shards' / 'train'}",
               f"eval.test={out / 'shards' / 'test'}"]
    return ov + list(cfg["train"]["overrides"])


def trainer_config(cfg: dict, out: Path, rnd: int, where: str = "pipeline config"):
    """The resolved trainer config of round ``rnd`` (errors name the YAML's train key)."""
    from mlcd_train import config as C

    try:
        tc = C.build_config(cfg["train"]["config"], trainer_overrides(cfg, out, rnd))
        C.validate(tc, cfg["nproc"], {"k": cfg["k"], "topk": cfg["l"]})  # what assign will write
    except MLCDError as exc:
        raise MLCDError(f"{where}: key 'train': {exc}") from None
    return tc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _json(path: Path) -> Any:
    from mlcd_core.io import load_json

    return load_json(path)


class Pipeline:
    """Runs the stages of a validated config into ``cfg['out']``; ``run()`` returns the summary."""

    def __init__(self, cfg: dict, quiet_train: bool = False, say: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg["out"]).resolve()
        self.quiet_train = quiet_train
        self.rows: list[dict] = []
        self.probes: dict[str, dict] = {}
        self.logs = self.out / "logs"
        self._say = say
        self.steps = trainer_config(cfg, self.out, 1).train.steps

    # ------------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        if self._say:
            self._say(msg)
        else:
            print(f"[pipeline] {msg}", file=sys.stderr, flush=True)

    def rdir(self, rnd: int, *parts) -> Path:
        return self.out.joinpath(f"round_{rnd}", *parts)

    def shards_dir(self, split: str) -> Path:
        return self.out / "shards" / split

    def student(self, rnd: int) -> Path:
        return self.rdir(rnd, "export", "student.pt")

    def teacher_spec(self, rnd: int) -> str:
        return self.cfg["teacher"]["model"] if rnd == 1 else f"mlcd:{self.student(rnd - 1)}"

    def call(self, stage: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """The stage's Python function ``fn(*args, **kwargs)`` in this process, announced as the
        call it is; its MLCDError names the stage (via :meth:`stage`)."""
        shown = [repr(str(a)) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        self.say(f"mlcd {stage}: {fn.__module__}.{fn.__name__}({', '.join(shown)})")
        return fn(*args, **kwargs)

    def stage(self, name: str, done: Callable[[], Path | None], fn: Callable[[], None],
              figure: Callable[[], str]) -> None:
        """Run ``fn`` unless ``done()`` names the file that marks the stage finished; record a row."""
        t0 = time.perf_counter()
        marker = done()
        if marker is not None:
            self.say(f"--- {name}: already done ({marker}), skipped")
            skipped = True
        else:
            self.say(f"--- {name}")
            try:
                fn()
            except MLCDError as exc:
                raise MLCDError(f"stage {name}: {exc}") from None
            skipped = False
        try:
            result = figure()
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise MLCDError(f"stage {name}: cannot read its result ({exc})") from None
        dt = time.perf_counter() - t0
        self.rows.append({"stage": name, "seconds": round(dt, 1), "result": result, "skipped": skipped})
        self.say(f"--- {name} {'(skipped) ' if skipped else ''}{dt:.1f}s: {result}")

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        return {k: v for k, v in self.cfg.items() if k not in FREE_KEYS}

    def check_identity(self) -> None:
        """A rerun resumes only the same run (``rounds`` may change); other settings are refused."""
        from mlcd_core.io import atomic_save_json

        path = self.out / "pipeline.json"
        if path.exists():
            old = _json(path)
            old = old.get("config") if isinstance(old, dict) else None
            if not isinstance(old, dict):
                raise MLCDError(f"{path}: not a pipeline record (expected {{'config': {{...}}}})")
            new = self.identity()
            if old != new:
                diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
                raise MLCDError(f"{path}: {self.out} holds a pipeline run with other settings {diff} (old, new); "
                                "use another out folder")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_save_json(path, {"config": self.identity()})

    # ------------------------------------------------------------------ stages
    def run_shards(self) -> None:
        inp = self.cfg["input"]
        splits = [("train", inp["train"])] + ([("test", inp["test"])] if inp["test"] else [])
        for split, src in splits:
            d = self.shards_dir(split)

            def make(split=split, src=src, d=d):
                from mlcd_train.data.shards import make_shards

                kw = {"shard_size": inp["shard_size"], "seed": self.cfg["seed"]}
                classes = self.shards_dir("train") / "classes.json"
                if split != "train" and classes.is_file():  # the test split gets the training ids
                    kw["classes"] = str(classes)
                self.call("shards", make_shards, src, str(d), **kw)

            self.stage(f"shards {split}", lambda d=d: _exists(d / "sizes.json"), make,
                       lambda d=d: f"{sum(_json(d / 'sizes.json').values())} images in {d}")

    def run_round(self, rnd: int) -> None:
        cfg, n = self.cfg, self.cfg["rounds"]
        tag = f"round {rnd}/{n}"
        emb, cl, lbl, tr = (self.rdir(rnd, x) for x in ("emb", "clusters", "labels", "train"))
        spec = self.teacher_spec(rnd)

        def embed():
            kw = {"workers": cfg["workers"]}
            t = cfg["teacher"]
            if rnd == 1:  # the teacher's options; embed() hands each embedder kind only its own
                kw.update(dim=t["dim"], image_size=t["image_size"])
                if t["pretrained"]:
                    kw["pretrained"] = t["pretrained"]
            self.call("embed", E.embed, str(self.shards_dir("train")), str(emb), spec, **kw)

        self.stage(f"{tag} embed ({'teacher ' + spec if rnd == 1 else 'round ' + str(rnd - 1) + ' student'})",
                   lambda: _complete(emb / "meta.json"), embed,
                   lambda: "{total} x {dim} ({embedder})".format(**_json(emb / "meta.json")))

        threads = {"threads": cfg["threads"]} if cfg["threads"] else {}
        self.stage(f"{tag} cluster", lambda: _exists(cl / "meta.json") and _exists(cl / "centroids.npy"),
                   lambda: self.call("cluster", K.cluster_folder, str(emb), cfg["k"], str(cl), seed=cfg["seed"],
                                     **threads),
                   lambda: "k = {k}, {iterations} iterations".format(**_json(cl / "meta.json")))
        self.stage(f"{tag} assign", lambda: _complete(lbl / "meta.json"),
                   lambda: self.call("assign", A.assign, str(emb), str(cl / "centroids.npy"), str(lbl),
                                     topk=cfg["l"], **threads),
                   lambda: _assign_figure(lbl, cfg["l"]))
        final = step_dir(tr / "checkpoints", self.steps)
        self.stage(f"{tag} train ({cfg['nproc']} rank{'s' if cfg['nproc'] > 1 else ''})",
                   lambda: _exists(final / "meta.json"), lambda: self.train(rnd),
                   lambda: _train_figure(tr / "metrics.jsonl"))
        pt = self.student(rnd)
        self.stage(f"{tag} export", lambda: _exported(pt, self.steps),
                   lambda: self.call("export", X.export, str(final), str(pt)),
                   lambda: f"step {_json(pt.with_suffix('.json'))['step']} -> {pt}")
        if cfg["probe"]["enabled"]:
            js = self.rdir(rnd, "probe", "student.json")
            self.stage(f"{tag} probe student", lambda: _exists(js),
                       lambda: self.probe(f"mlcd:{pt}", self.rdir(rnd, "probe"), js, fresh=True),
                       lambda: _probe_figure(js))
            self.probes[f"round {rnd} student"] = read_probe_result(js)

    def train(self, rnd: int) -> None:
        cfg = self.cfg
        argv = ["--config", cfg["train"]["config"]] + trainer_overrides(cfg, self.out, rnd)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"train_round_{rnd}.log"
        if cfg["nproc"] == 1:
            self.say(f"mlcd train {' '.join(argv)}" + (f"   (log: {log_path})" if self.quiet_train else ""))
            from mlcd_train import train

            with contextlib.ExitStack() as stack:
                if self.quiet_train:
                    log = stack.enter_context(open(log_path, "a", encoding="utf-8"))
                    stack.enter_context(contextlib.redirect_stdout(log))
                    stack.enter_context(contextlib.redirect_stderr(log))
                rc = train.main(argv)
            if rc:
                raise MLCDError(f"mlcd train exited with status {rc}")
            return
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(cfg["nproc"]),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mlcd_train.train"] + argv
        self.say(" ".join(cmd) + f"   (log: {log_path})")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            for line in proc.stdout:
                log.write(line)
                if not self.quiet_train:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
            rc = proc.wait()
        if rc:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise MLCDError(f"torchrun exited with status {rc}; see {log_path}:\n" + "\n".join(tail))

    def probe(self, spec: str, folder: Path, js: Path, fresh: bool, **extra) -> None:
        from mlcd_train.probe import probe

        p = self.cfg["probe"]
        kw = {"json": str(js), "workers": self.cfg["workers"], "seed": self.cfg["seed"], **extra}
        if fresh:
            kw["overwrite_features"] = True
        if p["l2_grid"]:
            kw["l2_grid"] = p["l2_grid"]
        if p["max_iter"]:
            kw["max_iter"] = p["max_iter"]
        self.call("probe", probe, spec, str(self.shards_dir("train")), str(self.shards_dir("test")), str(folder),
                  **kw)

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        self.check_identity()
        t0 = time.perf_counter()
        self.run_shards()
        for rnd in range(1, self.cfg["rounds"] + 1):
            self.run_round(rnd)
        summary = {"seconds": round(time.perf_counter() - t0, 1), "stages": self.rows, "probe": self.probes,
                   "rounds": self.cfg["rounds"], "config": self.cfg}
        from mlcd_core.io import atomic_save_json

        atomic_save_json(self.out / "summary.json", summary)
        if self.probes:
            plot_probe_bars(self.probes, self.out / "probe_rounds.png",
                            f"each round's student ({self.cfg['train']['config']}, k={self.cfg['k']}, "
                            f"l={self.cfg['l']})")
        return summary


# ----------------------------------------------------------------------------- done checks and figures

def _exists(path: Path) -> Path | None:
    return path if path.is_file() else None


def _complete(meta: Path) -> Path | None:
    """``meta`` when it records a finished stage (``complete: true``), else None."""
    if not meta.is_file():
        return None
    try:
        rec = _json(meta)
    except MLCDError:
        return None
    return meta if isinstance(rec, dict) and rec.get("complete") is True else None


def _exported(pt: Path, step: int) -> Path | None:
    side = pt.with_suffix(".json")  # written after the weights
    if not (pt.is_file() and side.is_file()):
        return None
    try:
        rec = _json(side)
    except MLCDError:
        return None
    return side if isinstance(rec, dict) and rec.get("step") == step else None


def _assign_figure(lbl: Path, l: int) -> str:
    stats = lbl / "stats.json"
    if stats.is_file():
        rec = _json(stats)
        purity = _find(rec, "purity_top1")
        purity = _find(rec, "purity") if purity is None else purity
        if isinstance(purity, (int, float)):
            return f"top-{l} labels, top-1 cluster purity {100 * purity:.1f}%"
    return f"top-{l} labels"


def _train_figure(metrics: Path) -> str:
    recs = read_metrics(metrics)
    if not recs:
        raise MLCDError(f"{metrics} has no training records")
    first, last = recs[0], recs[-1]
    fig = f"{last['step']} steps, loss {first['loss']:.3f} -> {last['loss']:.3f}"
    ev = read_eval(metrics)
    if ev:
        fig += f", k-NN top-1 {100 * ev[-1]['knn_top1']:.1f}% (best {100 * ev[-1]['knn_best']:.1f}%)"
    return fig


def read_probe_result(js: Path) -> dict:
    """A finished ``probe-*.json`` as the pipeline and the demo read it back: a dict whose
    ``linear.top1`` and ``knn.top1`` are accuracies in [0, 1]; else one line naming the file."""
    res = _json(js)
    for part in ("linear", "knn"):
        v = res.get(part) if isinstance(res, dict) else None
        top1 = v.get("top1") if isinstance(v, dict) else None
        if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0.0 <= top1 <= 1.0:
            raise MLCDError(f"{js}: '{part}.top1' is not an accuracy in [0, 1] ({top1!r}); "
                            "delete the file to redo the probe")
    return res


def _probe_figure(js: Path) -> str:
    res = read_probe_result(js)
    return f"linear {100 * res['linear']['top1']:.1f}%, 20-NN {100 * res['knn']['top1']:.1f}%"


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


def _records(path) -> list[dict]:
    from mlcd_core.io import read_regular

    out = []
    if not os.path.exists(path):
        return out
    text = read_regular(path, 1 << 31, what="metrics log").decode("utf-8", "replace")
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def read_metrics(path) -> list[dict]:
    """Training records (with ``loss``) of a trainer metrics.jsonl, one per step (the last wins after a resume)."""
    by_step = {r["step"]: r for r in _records(path) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def read_eval(path) -> list[dict]:
    """The in-training k-NN records (``knn_top1``, ``knn_best``) of a metrics.jsonl, one per step."""
    by_step = {r["step"]: r for r in _records(path) if "knn_top1" in r}
    return [by_step[s] for s in sorted(by_step)]


def _save_fig(fig, png_path) -> str:
    import matplotlib.pyplot as plt

    from mlcd_core.io import atomic_open

    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return str(png_path)


def plot_probe_bars(results: dict[str, dict], png_path, title: str) -> str:
    """Linear-probe and 20-NN top-1 of each named probe result side by side, values on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    lin = [100 * results[n]["linear"]["top1"] for n in names]
    knn = [100 * results[n]["knn"]["top1"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 2), 3.8))
    for off, vals, label in ((-0.2, lin, "linear probe"), (0.2, knn, "20-NN")):
        bars = ax.bar(x + off, vals, width=0.4, label=label)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("top-1 on the test split (%)")
    ax.set_ylim(0, min(100, max(lin + knn + [1]) + 12))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save_fig(fig, png_path)


def format_rows(rows: list[dict], total: float) -> str:
    w = max(len("stage"), *(len(r["stage"]) for r in rows))
    lines = [f"{'stage'.ljust(w)}  {'time':>8}  result", f"{'-' * w}  {'-' * 8}  {'-' * 40}"]
    lines += [f"{r['stage'].ljust(w)}  {r['seconds']:>7.1f}s  {'(done before) ' if r.get('skipped') else ''}"
              f"{r['result']}" for r in rows]
    lines.append(f"{'total'.ljust(w)}  {total:>7.1f}s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="pipeline YAML (see above)")
    p.add_argument("--out", default=None, help="output folder (default: the YAML's out); a rerun resumes")
    p.add_argument("--quiet-train", action="store_true", help="keep the trainer's output in OUT/logs only")
    return p


def run_pipeline(config: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 quiet_train: bool = False) -> tuple[Pipeline, dict]:
    """``mlcd pipeline``: every stage of the YAML ``config`` (see the module docstring) into its
    ``out`` (or ``out`` given here), round after round; a rerun resumes.  Returns the
    :class:`Pipeline` (its ``rows``, ``probes``, ``out``) and the summary written to
    ``OUT/summary.json``.  Bad input is an :class:`~mlcd_core.errors.MLCDError`."""
    from mlcd_core.lock import output_lock

    pipe = Pipeline(load(config, None if out is None else str(out)), quiet_train=quiet_train)
    # one pipeline per folder; its stages (in this process or its children) share the lock's
    # run key, so their own locks on the folders inside never refuse them (issue 15)
    with output_lock(pipe.out, "pipeline"):
        return pipe, pipe.run()


def main(argv: list[str] | None = None) -> int:
    """``mlcd pipeline``'s command line: the flags of :func:`build_parser` -> :func:`run_pipeline`."""
    args = build_parser().parse_args(argv)
    pipe, summary = run_pipeline(args.config, args.out, quiet_train=args.quiet_train)
    print(format_rows(pipe.rows, summary["seconds"]))
    print(f"\nartefacts in {pipe.out}: summary {pipe.out / 'summary.json'}"
          + (f", probes {pipe.out / 'probe_rounds.png'}" if pipe.probes else ""))
    return 0


if __name__ == "__main__":
    from mlcd_core.stage import run_main
    from mlcd_train import pipeline as _stage  # the module under its own name, as `mlcd pipeline` runs it

    sys.exit(run_main("pipeline", _stage.main, sys.argv[1:]))
