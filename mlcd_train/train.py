"""``mlcd train``: MLCD / Unicom / MLC pretraining of a ViT, on one process or under torchrun.

    torchrun --nnodes N --nproc_per_node G -m mlcd_train.train --config vit_b32_paper \\
        output_dir=runs/b32 data.shards=SHARDS data.labels=LABELS train.steps=100000
    mlcd train --config fashion_mnist_tiny output_dir=runs/tiny      # one process

What a step does: every rank takes ``train.global_batch_size / world_size`` images from its
seeded, resampled share of the shards (joined to their labels by key), the backbone (DDP, or
FSDP2 with ``train.parallel=fsdp``: trainer/parallel.py) embeds them, PartialFC computes the
global-mean loss over the sampled class centres, the backbone gradient is clipped, AdamW (no
decay on norms, biases, embeddings) and the centre optimiser step, and the learning rate
follows warm-up + cosine.  bf16 autocast on GPU.  With ``train.accum_steps=N`` the images come
as N micro-batches whose summed gradient is exactly that step's (:func:`accumulate_step`).

Faults:
- Checkpoints every ``train.save_every`` steps and at the end (``OUT/checkpoints``); each
  file through a temporary name, ``meta.json`` last; the last ``train.keep_last`` kept.
- ``resume=auto`` (default) continues from the newest complete checkpoint in OUT, with the
  very same data order, augmentation and negative sampling as an uninterrupted run (all are
  functions of (seed, rank, step / stream position)), so the weights match.  Resuming with
  another number of ranks re-splits the class centres; the data order then differs.
- SIGTERM / SIGUSR1: the flag is agreed between ranks (all-reduce, max) at the next sync
  point (log, save and eval steps, and every ``train.stop_check_every`` steps; one process
  reads it at every step), every rank saves that step and the run exits with status 0.
- Non-finite loss or gradient norm: the optimiser step is skipped on the device (a flag, no
  host read; the data and the schedule move on), counted in ``skipped_steps``; when a sync
  point sees ``train.max_nonfinite_steps`` in a row the run stops with an error (the last
  checkpoint is intact).  Between sync points a step reads nothing back from the device
  (trainer/step.py).
- Corrupt samples are skipped by the reader and counted (``corrupt_samples``); when more
  than ``data.max_corrupt_fraction`` of the records a loader worker read are corrupt the run
  stops with an error naming the shard.

Data: ``data.shards`` + ``data.labels``, or ``data.sources`` (several, each sample drawn from
one with probability proportional to its ``weight``; their labels must come from the same
centres).  The loader's position is part of every checkpoint (TrainStream.state_dict).

Logs (trainer/metrics.py): ``OUT/metrics.jsonl`` (step, loss, lr, img_per_s, data_wait,
grad_norm, tflops_per_device, mfu, peak_mem_gib, ...), tensorboard scalars in ``OUT/tb``,
wandb with ``train.wandb=PROJECT`` (run id kept in ``OUT/wandb_run_id``), a progress bar on
rank 0; ``OUT/config.yaml`` is the resolved config.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from mlcd_train import config as C
from mlcd_train.trainer import checkpoint as ck
from mlcd_train.trainer.data import (TrainStream, check_k_against_centroids, check_labels, check_same_centres,
                                     check_same_labels, data_sources, labels_identity, labels_meta, mix_seed)
from mlcd_train.trainer.metrics import MetricsLog, _step_of, open_metrics_log  # noqa: F401  (MetricsLog, _step_of: re-exported for tests, bench)
from mlcd_train.trainer.step import Batch, StepStats, accumulate_step, apply_step  # noqa: F401
from mlcd_train.trainer.optim import build_optimizer, lr_factor, set_lr
from mlcd_train.utils.dist import DistInfo, barrier, init_distributed
from mlcd_train.utils.errors import MLCDError

EPILOG = """\
Configs: --config takes a YAML file or a preset name of configs/ (%(presets)s).
Overrides: dotted key=value pairs after the options, values in YAML, e.g.
  train.steps=500 train.global_batch_size=256 optim.lr=5e-4 data.num_workers=8
  model.name=ViT-B-16-224 model.overrides={pos_embed: rope2d} loss.name=unicom loss.l=1
Keys the run needs: output_dir, data.shards, data.labels (the `mlcd assign` folder),
train.steps, train.global_batch_size; loss.num_classes comes from LABELS/meta.json.

Multi-GPU / multi-node: launch with torchrun (see launch/README.md); without torchrun or
SLURM variables the trainer runs as one process.  resume=auto (default) continues from
the newest complete checkpoint in output_dir; resume=none starts over; resume=PATH loads
that checkpoint folder.  SIGTERM or SIGUSR1 saves at the next step and exits 0.
init.checkpoint=PATH (a run, checkpoint folder or export) starts a fresh run from that
backbone (positions resized to the new image size; new Partial FC, optimiser, step 0); it
is ignored once output_dir holds a checkpoint of its own.
train.parallel=fsdp shards the backbone over the ranks (FSDP2; checkpoints in model_dcp/ and
optim_dcp/, resumable on any number of ranks, and from or to a ddp run); train.accum_steps=N
makes each step of N micro-batches, exactly the step of the whole batch.
Several data sources: data.sources=[{shards: A, labels: LA, weight: 3}, {shards: B, labels: LB,
weight: 1}] (labels assigned against the same centres).  MFU in the log: train.peak_flops=F
(FLOP/s of one device; known GPUs are recognised).  train.wandb=PROJECT logs to wandb too.
train.stop_check_every=N: steps between the ranks' stop-signal agreement (default 10).
"""


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(sorted(p.stem for p in C.CONFIGS_DIR.glob("*.yaml"))) if C.CONFIGS_DIR.is_dir() else ""
    p = argparse.ArgumentParser(
        prog="mlcd train", description="Train a ViT with the MLCD (multi-label cluster discrimination) loss.",
        epilog=EPILOG % {"presets": presets or "none"}, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None, help="YAML config file or preset name in configs/")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- helpers

class StopFlag:
    """Set by SIGTERM / SIGUSR1; read at step boundaries."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def agree_stop(local: bool, info: DistInfo, written: bool = True) -> tuple[bool, bool]:
    """(any rank asked to stop, every rank's background checkpoint write is done): one
    all-reduce, the step boundary's only one."""
    if not info.distributed:
        return local, written
    t = torch.tensor([1.0 if local else 0.0, 0.0 if written else 1.0],
                     device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    stop, unwritten = t.tolist()
    return stop > 0, unwritten == 0


def all_sum(values: list[float], info: DistInfo, op=None) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t.tolist()


def unwrap_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = C.build_config(args.config, args.overrides)
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    from mlcd_core.lock import output_lock

    # one run per output_dir (issue 15): a second run into it stops at once, naming this one;
    # the ranks of this run share the lock (rank 0 holds it)
    with output_lock(cfg.output_dir, "train") if cfg.output_dir else nullcontext():
        info = init_distributed(device=None if cfg.train.device == "auto" else cfg.train.device)
        if cfg.train.tune_malloc and info.device.type == "cpu":
            from mlcd_core.malloc import tune_malloc

            # process-wide, so set by the command (this process is the run), not by Trainer, which a
            # notebook may use; before the model's first buffers (mlcd_core/malloc.py)
            tune_malloc()
        try:
            return Trainer(cfg, info).run()
        finally:
            from mlcd_train.utils.dist import cleanup

            cleanup()


def autocast_context(precision: str, device: torch.device, cpu_autocast: bool = False):
    """bf16 / fp16 autocast on CUDA; on the CPU every precision runs in fp32 (see make_scaler),
    except bf16 with ``cpu_autocast`` (train.cpu_autocast).  The Partial FC logits run in fp32
    either way (partial_fc.py turns autocast off around them)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device.type == "cpu" and cpu_autocast and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles).  Not oneDNN's own
    ``_is_mkldnn_bf16_supported``: that is also true on AVX512 CPUs without bf16 (Skylake to Ice
    Lake servers), where bf16 is emulated and a step is slower than in fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return bool(torch.backends.mkldnn.is_available() and any(f() for f in checks if f is not None))
    except (AttributeError, RuntimeError):
        return False


def make_scaler(precision: str, device: torch.device):
    """The loss scaler of fp16 training on CUDA (torch.amp.GradScaler, its defaults: initial
    scale 2**16, halved on an overflow, doubled after 2000 clean steps); None otherwise: bf16
    needs none, and on the CPU fp16 runs in fp32 (CPU fp16 kernels are slow or missing, and
    the loss in fp32 needs no scaling)."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


class Trainer:
    def __init__(self, cfg: C.Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        meta = None
        if not cfg.data.synthetic:
            key = "data.sources" if cfg.data.sources else "data.labels"
            for src in data_sources(cfg) if (cfg.data.labels or cfg.data.sources) else []:
                if src["labels"] and not (Path(src["labels"]) / "meta.json").is_file():
                    raise MLCDError(f"config key '{key}': {src['labels']}/meta.json not found "
                                    "(is this a folder written by `mlcd assign`?)")
            if cfg.data.sources and all(isinstance(x, dict) and x.get("labels") for x in cfg.data.sources):
                meta = check_same_centres(data_sources(cfg))  # one set of centres, or refused naming both
            elif cfg.data.labels:
                meta = labels_meta(cfg.data.labels)
        self.labels_id = labels_identity(data_sources(cfg)[0]["labels"]) if meta is not None else None
        if meta is not None and info.is_main:  # once per run (labels_meta is read more than once, on every rank)
            check_k_against_centroids(meta, Path(data_sources(cfg)[0]["labels"]) / "meta.json", int(meta["k"]))
        C.validate(cfg, info.world_size, meta)
        self.out = Path(cfg.output_dir)
        self.ckdir = self.out / "checkpoints"
        # the loader's batch: one micro-batch (train.accum_steps of them per step)
        self.batch = cfg.train.global_batch_size // info.world_size // cfg.train.accum_steps

    # ------------------------------------------------------------------ setup
    def _build_model(self):
        from mlcd_train.models import create_model, model_config_to_dict

        cfg, info = self.cfg, self.info
        overrides = dict(cfg.model.overrides)
        if cfg.data.image_size and "image_size" not in overrides:
            overrides["image_size"] = cfg.data.image_size
        if cfg.model.drop_path is not None:
            overrides["drop_path"] = cfg.model.drop_path
        torch.manual_seed(cfg.seed)
        core = create_model(cfg.model.name, **overrides).to(info.device)
        if cfg.model.grad_checkpointing:
            from mlcd_train.models import is_resnet

            if is_resnet(core):  # timm re-runs the forward in train mode: BatchNorm statistics updated twice
                raise MLCDError("config key 'model.grad_checkpointing': not for the resnet family (the recomputed "
                                "forward would update BatchNorm running statistics twice per step)")
            core.set_grad_checkpointing(True)
        self.core = core
        self.model_config = model_config_to_dict(core)
        self.image_size = core.config.image_size
        emb = cfg.loss.embedding_size or core.embed_dim
        if emb != core.embed_dim:
            raise MLCDError(f"config key 'loss.embedding_size': {emb} differs from the model's output size "
                            f"{core.embed_dim}")
        return emb

    def _parallelize(self) -> None:
        """DDP / FSDP2 wrapping (trainer/parallel.py), then torch.compile when asked."""
        from mlcd_train.trainer import parallel as par

        model = par.parallelize(self.core, self.cfg, self.info)
        self.model = torch.compile(model) if self.cfg.model.compile else model

    def _check_pfc_memory(self, emb: int) -> None:
        """Refuse, on every rank alike, a k whose Partial FC shards would not fit (trainer/memory.py)."""
        from mlcd_train.trainer.memory import check_pfc_memory

        cfg, info = self.cfg, self.info
        labels = cfg.data.labels or (data_sources(cfg)[0]["labels"] if cfg.data.sources else None)
        source = (f"{labels}/meta.json: key 'k'" if labels and not cfg.data.synthetic
                  else "config key 'loss.num_classes'")
        check_pfc_memory(cfg.loss.num_classes, emb, info, source,
                         gather=(lambda rec: gather_objects(rec, info)) if info.distributed else None)

    def _build_pfc(self, emb: int):
        from mlcd_train import partial_fc as P

        lc = self.cfg.loss
        self.pfc = P.PartialFC(emb, lc.num_classes, sample_rate=lc.sample_rate, scale=lc.scale,
                               margin=lc.margin, margin_type=lc.margin_type, loss=lc.name, seed=self.cfg.seed,
                               device=self.info.device)
        oc = self.cfg.optim
        self.pfc_lr = oc.pfc_lr if oc.pfc_lr is not None else oc.lr
        wd = oc.pfc_weight_decay if oc.pfc_weight_decay is not None else oc.weight_decay
        self.pfc_opt = self.pfc.make_optimizer(self.pfc_lr, weight_decay=wd, betas=tuple(oc.betas), eps=oc.eps,
                                               kind="adamw")

    def _build_data(self, start_step: int) -> TrainStream:
        """This rank's stream of micro-batches, placed at micro-batch ``start_step`` (and at the
        saved loader position when the resume allows an exact one)."""
        stream = TrainStream(self.cfg, self.info.rank, self.info.world_size, self.batch, self.image_size,
                             pin_memory=self.info.device.type == "cuda")
        state = dict(self.loader_state or {})
        state["batches"] = start_step
        stream.load_state_dict(state)
        return stream

    def _check_data(self):
        """Rank 0 checks the label folder against the shards; every rank raises its verdict."""
        cfg, info = self.cfg, self.info
        if cfg.data.synthetic:
            return
        err = None
        if info.is_main:
            try:
                from mlcd_train.data.reader import list_shards, sizes_counts

                for src in data_sources(cfg):
                    shards = list_shards(src["shards"])
                    if not shards:
                        key = "data.sources" if cfg.data.sources else "data.shards"
                        raise MLCDError(f"config key '{key}': no shards found in {src['shards']}")
                    sizes_path = Path(src["shards"]) / "sizes.json"  # read checked (issue 15), as list_shards does
                    sizes = sizes_counts(src["shards"]) if sizes_path.is_file() else None
                    check_labels(shards, src["labels"], sizes, cfg.loss.l, cfg.data.check_keys_shards)
            except MLCDError as exc:
                err = str(exc)
        if info.distributed:  # the other ranks must not wait at a barrier for a rank that gave up
            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        if err:
            raise MLCDError(err)

    def _on_main(self, fn) -> None:
        """Run ``fn`` on rank 0 while the others wait; an error there is raised on every rank
        (instead of leaving them at a barrier until the collective timeout)."""
        err = None
        if self.info.is_main:
            try:
                fn()
            except (MLCDError, OSError, RuntimeError, ValueError) as exc:
                err = str(exc) if isinstance(exc, MLCDError) else f"{type(exc).__name__}: {exc}"
        if self.info.distributed:
            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        if err:
            raise MLCDError(f"evaluation on rank 0: {err}")

    def _build_eval(self, start: int = 0) -> None:
        """Rank 0's k-NN evaluator (eval.every > 0) and the best figure so far (OUT/best)."""
        from mlcd_train.trainer import evaluation as E

        self.evaluator, self.best = None, None
        ec = self.cfg.eval
        if ec.every <= 0:
            return
        def build():
            a = self.cfg.data.aug
            self.evaluator = E.KNNEvaluator(ec, self.image_size, a.mean, a.std, self.info.device)
            meta = E.best_meta(self.out) if start > 0 else None  # a fresh run does not inherit another's best
            self.best = meta["knn_top1"] if meta else None

        self._on_main(build)

    def _evaluate(self, log: "MetricsLog", step: int) -> None:
        """k-NN top-1 on rank 0 (the other ranks wait); OUT/best follows the best figure."""
        from mlcd_train.trainer import evaluation as E

        full = None
        if self.fsdp:  # every rank takes part in gathering the sharded backbone; rank 0 scores a copy
            from mlcd_train.trainer.parallel import full_state_dict

            full = full_state_dict(self.core, sharded=True)

        def run():
            t0 = time.perf_counter()
            net = self.core
            if full is not None:
                from mlcd_train.models import create_model_from_config

                net = create_model_from_config(dict(self.model_config)).to(self.info.device)
                net.load_state_dict(full)
            top1 = self.evaluator.evaluate(net)
            improved = self.best is None or top1 > self.best
            if improved and self.cfg.eval.keep_best:
                E.save_best(self.out, step, top1, full if full is not None else unwrap_state_dict(self.core),
                            self.model_config)
            self.best = top1 if improved else self.best
            log.log({"step": step, "knn_top1": top1, "knn_best": self.best}, section="eval")
            print(f"eval step {step}: {self.cfg.eval.knn_k}-NN top-1 {top1:.2%} (best {self.best:.2%}) "
                  f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

        self._on_main(run)

    # ------------------------------------------------------------------ checkpoints
    def _resume_folder(self) -> Path | None:
        r = self.cfg.resume
        if r == "none":
            newest = ck.latest_complete(self.ckdir)
            if newest is not None:
                raise MLCDError(f"config key 'resume': resume=none but {self.ckdir} already holds checkpoints "
                                f"(newest {newest.name}); use resume=auto to continue that run, or another output_dir")
            return None
        if r == "auto":
            return ck.latest_complete(self.ckdir)
        p = Path(r)
        if not (p / "meta.json").is_file():
            raise MLCDError(f"config key 'resume': {p} is not a complete checkpoint folder (no meta.json)")
        step = int(ck.read_meta(p)["step"])
        later = [q.name for s, q in ck.list_checkpoints(self.ckdir) if s > step]
        if later:
            # they would outlive this run's own checkpoints (pruning keeps the highest steps) and
            # a later resume=auto would continue from them: two runs mixed in one folder
            raise MLCDError(f"config key 'resume': {self.ckdir} holds checkpoints past step {step} of {p} "
                            f"({', '.join(later)}); move them away to branch from {p.name}, or use "
                            f"another output_dir")
        return p

    def _load(self, folder: Path) -> dict:
        from mlcd_train import partial_fc as P

        from mlcd_train.trainer import parallel as par

        info = self.info
        if par.is_sharded_checkpoint(folder):  # written under fsdp: loads into FSDP, DDP or one process
            par.load_sharded(folder, self.core, self.opt)
        elif self.fsdp:  # written under ddp (full model.pt / optimizer.pt), sharded here
            m = ck.load(folder, "model.pt")
            if not isinstance(m, dict) or not isinstance(m.get("state_dict"), dict):
                raise MLCDError(f"{folder}/model.pt: no state_dict")
            par.load_full_into_sharded(folder, self.core, self.opt, m["state_dict"], ck.load(folder, "optimizer.pt"))
        else:
            try:
                m = ck.load(folder, "model.pt")
                self.core.load_state_dict(m["state_dict"])
            except (RuntimeError, KeyError) as exc:
                raise MLCDError(f"{folder}/model.pt: does not fit model {self.cfg.model.name} ({exc})") from None
            self.opt.load_state_dict(ck.load(folder, "optimizer.pt"))
        P.load_partial_fc(self.pfc, folder, self.pfc_opt)
        st = ck.load(folder, "trainer_state.pt")
        check_same_labels(st.get("labels"), self.labels_id, folder)  # same k, other centres: refused
        if self.scaler is not None and isinstance(st.get("scaler"), dict):
            self.scaler.load_state_dict(st["scaler"])  # the loss scale the run had reached
        if st["world_size"] == info.world_size:
            ck.set_rng_state(st["rng"][info.rank])
        elif info.is_main:
            print(f"mlcd train: resuming a {st['world_size']}-rank checkpoint on {info.world_size} ranks: "
                  "class centres re-split; the data order differs from the original run", file=sys.stderr)
        changed = [f"{key} {st[key]} -> {now}" for key, now in self._stream_settings().items()
                   if key in st and st[key] != now]
        if changed and info.is_main:
            print(f"mlcd train: resuming {folder} with other data-stream settings ({'; '.join(changed)}): "
                  "training continues, but not on the stream the original run would have read", file=sys.stderr)
        if st["world_size"] == info.world_size and not changed:
            if st.get("loader"):
                self.loader_state = dict(st["loader"][info.rank])
            elif st.get("positions"):  # checkpoints written before the loader had a state_dict
                self.loader_state = {"positions": {int(w): [int(n)] for w, n in st["positions"][info.rank].items()}}
        return st

    def _stream_settings(self) -> dict:
        """What the position and order of the data stream depend on, besides the step."""
        d = self.cfg.data
        return {"batch_per_rank": self.batch, "seed": self.cfg.seed, "num_workers": d.num_workers,
                "shuffle_buffer": d.shuffle_buffer,
                "sources": [(s["shards"], s["weight"]) for s in data_sources(self.cfg)] if d.sources else None}

    def _save(self, step: int) -> None:
        from mlcd_train import partial_fc as P
        from mlcd_train.trainer import parallel as par

        info = self.info
        folder = ck.step_dir(self.ckdir, step)
        if step in self.saved:
            return
        self._finish_pending(wait=True)
        if info.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            # a folder of an earlier run at this step: mark it incomplete before replacing its
            # files, and drop its PFC shards (one of more ranks would outlive this save)
            (folder / "meta.json").unlink(missing_ok=True)
            for old in folder.glob(P.shard_file_name("*")):
                old.unlink(missing_ok=True)
            for old in ("model.pt", "optimizer.pt"):
                (folder / old).unlink(missing_ok=True)
            par.clear_sharded(folder)
        barrier()
        P.save_partial_fc(self.pfc, folder / P.shard_file_name(info.rank), self.pfc_opt)
        rngs = gather_objects(ck.rng_state(), info)
        loader = gather_objects(self.data.state_dict() if self.data is not None else None, info)
        local_corrupt = self.data.corrupt() if self.data is not None else 0
        self.corrupt_total = self.corrupt_offset + int(all_sum([float(local_corrupt)], info)[0])
        if info.is_main:
            state = {"step": step, "samples_seen": step * self.cfg.train.global_batch_size,
                     "world_size": info.world_size, **self._stream_settings(), "labels": self.labels_id,
                     "data_batches_consumed": step * self.cfg.train.accum_steps, "skipped_steps": self.skipped,
                     "corrupt": self.corrupt_total, "rng": rngs, "loader": loader,
                     # the older form ({worker: records of the first source} per rank), kept for readers of it
                     "positions": [{w: p[0] for w, p in (st or {}).get("positions", {}).items()} for st in loader],
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "schedule": {"name": self.cfg.optim.schedule, "warmup_steps": self.cfg.optim.warmup_steps,
                                  "total": self.cfg.train.steps}}
            if self.sharded_ckpt:
                ck.save_trainer_state(folder, state)
            else:
                ck.save_main_files(folder, step, unwrap_state_dict(self.core), self.model_config,
                                   self.opt.state_dict(), state)
        self.saved.add(step)
        if self.sharded_ckpt:
            pending = par.save_sharded(folder, self.core, self.opt, self.async_group)
            self.pending = (step, folder, pending)
            if self.async_group is not None:
                return  # finished by _finish_pending once every rank's write is done
        self._finish_pending(wait=True)
        if not self.sharded_ckpt:
            self._finish(step, folder)

    def _finish_pending(self, wait: bool) -> None:
        """Complete the sharded save in flight (every rank calls it at the same point): wait for
        this rank's writes, then rank 0 names the DCP folders and writes meta.json."""
        if self.pending is None:
            return
        step, folder, pending = self.pending
        if wait:
            pending.wait()
        self.pending = None
        self._finish(step, folder)

    def _finish(self, step: int, folder: Path) -> None:
        """After every rank wrote its files: meta.json (the checkpoint is complete), pruning."""
        from mlcd_train.trainer import parallel as par

        info = self.info
        barrier()
        if info.is_main:
            if self.sharded_ckpt:
                par.finish_sharded(folder)
            meta = {"step": step, "world_size": info.world_size,
                    "samples_seen": step * self.cfg.train.global_batch_size,
                    "model": self.cfg.model.name, "time": time.time()}
            if self.sharded_ckpt:  # what `mlcd export` needs beside model_dcp/ (there is no model.pt)
                meta.update(parallel="fsdp", model_config=self.model_config)
            ck.write_meta(folder, meta)
            ck.prune(self.ckdir, self.cfg.train.keep_last)
        barrier()

    # ------------------------------------------------------------------ setup
    def setup(self) -> int:
        """Model, Partial FC, optimisers, data check, resume (or init.checkpoint); the start step."""
        from mlcd_train.trainer import parallel as par

        cfg, info = self.cfg, self.info
        emb = self._build_model()
        self._check_pfc_memory(emb)  # before the centres are allocated: a wrong k is one line, not an OOM
        self._build_pfc(emb)
        self.fsdp = par.uses_fsdp(cfg, info)  # the backbone is sharded (fsdp on more than one rank)
        self.sharded_ckpt = cfg.train.parallel == "fsdp"  # DCP checkpoints, on one process too
        self.scaler = make_scaler(cfg.train.precision, info.device)
        if info.is_main and info.device.type != "cuda":
            if cfg.train.precision != "fp32" and not cfg.train.cpu_autocast:
                print(f"mlcd train: train.precision={cfg.train.precision} runs in fp32 on the CPU "
                      "(autocast and loss scaling are for CUDA; train.cpu_autocast=true autocasts bf16 "
                      "on the CPU)", file=sys.stderr)
            elif cfg.train.cpu_autocast and not cpu_has_fast_bf16():
                print("mlcd train: warning: train.cpu_autocast=true on a CPU without native bf16 "
                      "(AVX512-BF16 or AMX): the steps are likely slower than in fp32", file=sys.stderr)
            elif cfg.train.cpu_autocast:
                print("mlcd train: bf16 autocast on the CPU (train.cpu_autocast); parameters and the loss "
                      "in fp32", file=sys.stderr)
        self.skipped, self.corrupt_total, self.corrupt_offset = 0, 0, 0
        self.saved: set[int] = set()
        # the loader's saved position (TrainStream.state_dict) when the resume can use it
        self.loader_state: dict | None = None
        self.data: TrainStream | None = None
        self._check_data()
        folder = self._resume_folder()
        if folder is None and cfg.init.checkpoint:  # before anything is written: a bad file leaves no trace
            self._init_from_weights(cfg.init.checkpoint)
        # wrapped after init.checkpoint (it loads full tensors into the plain module), the
        # optimiser built over the parameters the wrapping leaves (FSDP's sharded DTensors)
        self._parallelize()
        self.opt = build_optimizer(self.core, cfg.optim, info.device)
        self.async_group = None
        if cfg.train.async_save and self.fsdp and info.device.type == "cuda":
            self.async_group = dist.new_group(backend="gloo")  # the background writer's own collectives
        elif cfg.train.async_save and info.is_main:
            # on the CPU (gloo) dcp.async_save's writer thread never completed in our tests (torch 2.14)
            print("mlcd train: train.async_save needs fsdp on CUDA; checkpoints are written synchronously",
                  file=sys.stderr)
        self.pending = None  # (step, folder, parallel.PendingSave) of a background save
        barrier()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            removed = ck.clean_incomplete(self.ckdir)
            for p in removed:
                print(f"mlcd train: removed incomplete checkpoint {p}", file=sys.stderr)
            C.save_config(cfg, self.out / "config.yaml")
        barrier()
        start = 0
        if folder is not None:
            st = self._load(folder)
            start = int(st["step"])
            self.skipped = int(st.get("skipped_steps", 0))
            self.corrupt_total = self.corrupt_offset = int(st.get("corrupt", 0))
            if info.is_main:
                print(f"mlcd train: resumed from {folder} (step {start})", file=sys.stderr)
                if cfg.init.checkpoint:
                    print(f"mlcd train: init.checkpoint={cfg.init.checkpoint} ignored: the run resumes from its own "
                          f"checkpoint {folder}", file=sys.stderr)
        return start

    def _init_from_weights(self, path: str) -> None:
        """A fresh run (step 0) whose backbone starts from ``path`` (init.checkpoint); every rank
        reads the file itself, into the plain module (before DDP / FSDP wrap it)."""
        from mlcd_train.trainer.init import init_backbone

        where, notes = init_backbone(self.core, path)
        if self.info.is_main:
            for note in notes:
                print(f"mlcd train: init.checkpoint: {note}", file=sys.stderr)
            print(f"mlcd train: backbone initialised from {where}; Partial FC, optimiser and schedule start "
                  "fresh at step 0", file=sys.stderr)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        cfg, info = self.cfg, self.info
        start = self.setup()
        total = cfg.train.steps
        if start >= total:
            if info.is_main:
                print(f"mlcd train: already at step {start} of {total}; nothing to do", file=sys.stderr)
            return 0
        if info.is_main:
            nparam = sum(p.numel() for p in self.core.parameters())
            accum_note = f" x {cfg.train.accum_steps} micro-batches" if cfg.train.accum_steps > 1 else ""
            print(f"mlcd train: {cfg.model.name} ({nparam / 1e6:.1f}M parameters) on {info.world_size} "
                  f"rank(s) [{info.backend or 'single process'}, {info.device.type}], batch "
                  f"{cfg.train.global_batch_size} ({self.batch} per rank{accum_note}), loss {cfg.loss.name} "
                  f"k={cfg.loss.num_classes} "
                  f"l={cfg.loss.l} r={cfg.loss.sample_rate}, steps {start}->{total}, output {self.out}",
                  file=sys.stderr, flush=True)
        self._build_eval(start)
        self._measure_flops()
        log = open_metrics_log(self.out, start, info.is_main, info.distributed, cfg.train.wandb, C.to_dict(cfg))
        try:
            self.data = data = self._build_data(start * cfg.train.accum_steps)  # in micro-batches
        except BaseException:
            log.close()
            raise
        stop = StopFlag()
        stop.install()
        try:
            return self._loop(data, start, total, log, stop)
        finally:
            stop.restore()
            log.close()
            data.close()

    def _measure_flops(self) -> None:
        """Training FLOPs per image (trainer/perf.py), counted once on a meta-device copy of the
        tower, and the device's peak for MFU (None: n/a)."""
        from mlcd_train.trainer import perf

        lc = self.cfg.loss
        try:
            fwd = perf.forward_flops_per_image(self.model_config, self.image_size)
        except Exception as exc:  # a model the meta device cannot run: the log says n/a
            fwd = 0
            if self.info.is_main:
                print(f"mlcd train: model FLOPs not counted ({type(exc).__name__}: {exc}); MFU n/a",
                      file=sys.stderr)
        sampled = min(lc.num_classes, max(1, int(math.ceil(lc.sample_rate * lc.num_classes))))
        self.flops_per_image = perf.train_flops_per_image(fwd, self.pfc.embedding_size, sampled) if fwd else None
        self.peak_flops = perf.peak_flops(self.info.device, self.cfg.train.peak_flops)

    def _sync_point(self, step: int, total: int) -> bool:
        """Steps on which the host reads the device counters and the ranks agree on a stop:
        log, save and evaluation steps, the last, and every ``train.stop_check_every``."""
        t, e = self.cfg.train, self.cfg.eval
        return (step % t.log_every == 0 or step % t.stop_check_every == 0 or step % t.save_every == 0
                or step == total or (e.every > 0 and step % e.every == 0))

    def _check_nonfinite(self, counts: dict, step: int) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        if counts["worst_run"] >= limit:
            raise MLCDError(f"train: loss or gradient norm not finite for {counts['worst_run']} steps in a row "
                            f"(seen at step {step}; limit train.max_nonfinite_steps={limit}); lower optim.lr or "
                            f"check the data. The last checkpoint in {self.ckdir} is intact.")

    def _loop(self, data: TrainStream, start: int, total: int, log: MetricsLog, stop: StopFlag) -> int:
        """The steps.  Nothing is read back from the device in a step: the loss, the grad norm and
        the non-finite verdict stay in :class:`StepStats` until a sync point (:meth:`_sync_point`),
        where one transfer reads them and one all-reduce agrees on a stop signal."""
        from mlcd_train.utils.progress import progress

        cfg, info = self.cfg, self.info
        dev = info.device
        amp = autocast_context(cfg.train.precision, dev, cfg.train.cpu_autocast)
        params = [p for p in self.core.parameters() if p.requires_grad]
        clip = cfg.optim.clip_grad_norm
        clip_fn = None
        if self.fsdp:
            from mlcd_train.trainer.parallel import clip_grad_norm_ as clip_fn  # the norm over every shard
        opts = [(self.opt, cfg.optim.lr), (self.pfc_opt, self.pfc_lr)]
        stats = StepStats(dev)
        # a bar on a terminal; plain lines (one per log step) in batch logs, where \r updates pile up
        self.lines = (info.is_main and not sys.stderr.isatty() and os.environ.get("MLCD_QUIET", "0") != "1")
        self.t_start, self.start_step = time.perf_counter(), start
        bar = progress(total=total, initial=start, desc="train", unit="step", rank=info.rank,
                       disable=True if self.lines else None)
        win = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": 0.0, "norm": 0.0, "good": 0}
        step = start
        accum = cfg.train.accum_steps
        while step < total:
            micro = []
            for _ in range(accum):  # accum_steps micro-batches make one optimiser step
                t0 = time.perf_counter()
                batch = next(data)
                win["wait"] += time.perf_counter() - t0
                micro.append(batch.to(dev, channels_last=cfg.train.channels_last))
            factor = lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
            set_lr(opts, factor)
            # negative sampling and any other torch randomness: a function of (seed, step, rank)
            torch.manual_seed(mix_seed(cfg.seed, step, info.rank))
            self.pfc.generator.manual_seed(mix_seed(cfg.seed, step, info.rank, 0xFC))
            # Partial FC's collective input check reads its verdict on the host: only on this run's
            # first step and on sync points; the steps between fold their label range into a device
            # record that the next check reports (naming the steps)
            self.pfc.check_inputs = step == start or self._sync_point(step + 1, total)
            self.pfc.step_tag = step + 1
            loss_t, gnorm_t, ok_t = accumulate_step(self.model, self.pfc, micro, params, clip,
                                                    (self.opt, self.pfc_opt), amp, self.scaler, clip_fn,
                                                    sync=False)
            stats.update(loss_t, gnorm_t, ok_t)
            self.opt.zero_grad(set_to_none=True)
            self.pfc_opt.zero_grad(set_to_none=True)
            step += 1
            win["steps"] += 1
            bar.update(1)
            # one process reads its own flag at every step (no collective); ranks agree at sync points
            stopping = stop.signum != 0 and not info.distributed
            sync = self._sync_point(step, total) or stopping
            if sync:
                counts = stats.read()
                self.skipped += counts["skipped"]
                win["loss"] += counts["loss_sum"]
                win["norm"] += counts["norm_sum"]
                win["good"] += counts["good"]
                self._check_nonfinite(counts, step)
                stopping, written = agree_stop(stop.signum != 0, info,
                                               self.pending is None or self.pending[2].done())
                if self.pending is not None and written:
                    self._finish_pending(wait=True)  # every rank's write is done: wait() returns at once
            if sync and (step % cfg.train.log_every == 0 or step == total or stopping):
                self._log(log, bar, step, factor, win)
                win = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": 0.0, "norm": 0.0, "good": 0}
            if cfg.eval.every > 0 and not stopping and (step % cfg.eval.every == 0 or step == total):
                self._evaluate(log, step)
            if stopping or step % cfg.train.save_every == 0 or step == total:
                self._save(step)
                win["t0"] = time.perf_counter()  # img/s measures training, not saving
            if stopping:
                bar.close()
                self._finish_pending(wait=True)
                if info.is_main:
                    print(f"mlcd train: stop signal received; saved step {step} in {self.ckdir}; exiting",
                          file=sys.stderr)
                return 0
        bar.close()
        self._finish_pending(wait=True)
        if info.is_main:
            print(f"mlcd train: done, {total} steps; checkpoints in {self.ckdir}", file=sys.stderr)
        return 0

    def _log(self, log, bar, step, factor, win):
        """One log record; loss and grad norm are means over the window's applied (finite) steps,
        NaN when it had none; throughput, model FLOP/s, MFU and peak memory of the window."""
        from mlcd_train.trainer import perf

        cfg, info = self.cfg, self.info
        dt = max(time.perf_counter() - win["t0"], 1e-9)
        good, loss_sum, norm_sum = win["good"], win["loss"], win["norm"]
        if good == 0:
            loss_sum = norm_sum = float("nan")
        good = max(1, good)
        corrupt = self.data.corrupt() if self.data is not None else 0
        loss_m, norm_m, wait, corrupt = all_sum([loss_sum / good, norm_sum / good, win["wait"] / dt, float(corrupt)],
                                                info)
        (mem,) = all_sum([perf.peak_memory_gib(info.device)], info, op=dist.ReduceOp.MAX if info.distributed else None)
        ws = info.world_size
        self.corrupt_total = self.corrupt_offset + int(corrupt)
        img_s = win["steps"] * cfg.train.global_batch_size / dt
        flops = self.flops_per_image * img_s / ws if self.flops_per_image else None  # per device
        rec = {"step": step, "loss": loss_m / ws, "lr": cfg.optim.lr * factor,
               "img_per_s": img_s, "data_wait": wait / ws,
               "grad_norm": norm_m / ws, "skipped_steps": self.skipped, "corrupt_samples": self.corrupt_total,
               "samples_seen": step * cfg.train.global_batch_size,
               "tflops_per_device": flops / 1e12 if flops is not None else None,
               "mfu": flops / self.peak_flops if flops is not None and self.peak_flops else None,
               "peak_mem_gib": mem}
        log.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}",
                        wait=f"{rec['data_wait']:.1%}", refresh=False)
        if self.lines:
            total = cfg.train.steps
            el = time.perf_counter() - self.t_start
            eta = el / max(1, step - self.start_step) * (total - step)
            mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "n/a"
            print(f"train step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
                  f"{rec['img_per_s']:.0f} img/s data-wait {rec['data_wait']:.1%} grad-norm {rec['grad_norm']:.3g} "
                  f"skipped {self.skipped} MFU {mfu} peak-mem {mem:.2f} GiB "
                  f"elapsed {el / 60:.1f} min ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    from mlcd_train.cli import run_stage

    sys.exit(run_stage("train", sys.argv[1:]))
