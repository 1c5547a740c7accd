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
- SIGTERM / SIGUSR1: the flag is agreed between ranks (all-reduce, max) at the next step
  boundary, every rank saves that step and the run exits with status 0.
- Non-finite loss or gradient norm: the optimiser step is skipped (the data and the
  schedule move on), counted in ``skipped_steps``; after ``train.max_nonfinite_steps``
  in a row the run stops with an error (the last checkpoint is intact).
- Corrupt samples are skipped by the reader and counted (``corrupt_samples``); when more
  than ``data.max_corrupt_fraction`` of the records a loader worker read are corrupt the run
  stops with an error naming the shard.

Logs: ``OUT/metrics.jsonl`` (step, loss, lr, img_per_s, data_wait, grad_norm, ...),
tensorboard scalars in ``OUT/tb``, a progress bar on rank 0; ``OUT/config.yaml`` is the
resolved config.
"""
from __future__ import annotations

import argparse
import json
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
from mlcd_train.trainer.data import (SyntheticBatches, build_shard_loader, check_labels, check_same_labels,
                                     labels_identity, labels_meta, mix_seed)
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
optim_dcp/, resumable on any number of ranks); train.accum_steps=N makes each step of N
micro-batches, exactly the step of the whole batch.
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


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or cut one (a write cut short by a
    kill or a full disk), which a resume drops rather than failing on."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else math.inf
    except (ValueError, AttributeError):
        return math.inf


class MetricsLog:
    """``OUT/metrics.jsonl`` (append, one object per logged step) and tensorboard scalars."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if start_step > 0 and self.path.is_file():  # drop lines past the checkpoint we resumed from
            from mlcd_train.utils.io import atomic_write_text

            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= start_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        elif start_step == 0 and self.path.is_file():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        self.f = open(self.path, "a", encoding="utf-8")

    def log(self, rec: dict, section: str = "train") -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        step = rec["step"]
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(f"{section}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            self.tb.close()


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
        try:
            return Trainer(cfg, info).run()
        finally:
            from mlcd_train.utils.dist import cleanup

            cleanup()


def autocast_context(precision: str, device: torch.device):
    """bf16 / fp16 autocast on CUDA; on the CPU every precision runs in fp32 (see make_scaler)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


def make_scaler(precision: str, device: torch.device):
    """The loss scaler of fp16 training on CUDA (torch.amp.GradScaler, its defaults: initial
    scale 2**16, halved on an overflow, doubled after 2000 clean steps); None otherwise: bf16
    needs none, and on the CPU fp16 runs in fp32 (CPU fp16 kernels are slow or missing, and
    the loss in fp32 needs no scaling)."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def apply_step(loss: torch.Tensor, params: list, clip: float, optimizers, scaler=None,
               clip_fn=None, loss_before: torch.Tensor | None = None) -> tuple[float, float, bool]:
    """Backward, clip the backbone gradient, step every optimiser: (loss, grad norm, applied).

    The step is applied only when the loss and the (unscaled) backbone gradient norm are
    finite; that is the one decision every rank takes alike (DDP has averaged the gradient,
    the loss is the global mean).  With a ``scaler`` (fp16) the scaled loss is backpropagated
    and every optimiser's gradients are unscaled before clipping, so the norm is the true
    one: an overflow of the scaled gradient reads as a non-finite norm and skips the step
    like any other non-finite step; ``scaler.update()`` then lowers the scale."""
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)
    gnorm = (clip_fn or torch.nn.utils.clip_grad_norm_)(params, clip if clip > 0 else float("inf"))
    total = loss.detach() if loss_before is None else loss.detach() + loss_before
    loss_v, gnorm_v = float(total), float(gnorm)
    applied = math.isfinite(loss_v) and math.isfinite(gnorm_v)
    if applied:
        for opt in optimizers:
            opt.step()
    if scaler is not None:
        scaler.update()  # from the overflow checks unscale_ recorded
    return loss_v, gnorm_v, applied


def accumulate_step(model, pfc, micro: list, params: list, clip: float, optimizers, amp=None, scaler=None,
                    clip_fn=None) -> tuple[float, float, bool]:
    """One optimiser step over the micro-batches ``[(images, labels), ...]`` of this rank:
    exactly the step of their concatenation (train.accum_steps).  The Partial FC's sampled
    classes are drawn once from the labels of all of them (``pfc.plan``), each micro loss is
    scaled by 1 / len(micro) so the summed gradient is the full batch's mean-loss gradient;
    DDP reduces only the last micro-batch's (accumulated) gradient.  Returns apply_step's."""
    n = len(micro)
    if n > 1:
        pfc.plan(torch.cat([y for _, y in micro]))
    before = None
    for i, (images, labels) in enumerate(micro):
        last = i == n - 1
        no_sync = getattr(model, "no_sync", None) if not last else None
        with (no_sync() if no_sync is not None else nullcontext()):
            with amp if amp is not None else nullcontext():
                emb = model(images)
            loss = pfc(emb if emb.dtype == torch.float64 else emb.float(), labels)
            if n > 1:
                loss = loss / n
            if last:
                break
            (scaler.scale(loss) if scaler is not None else loss).backward()
        before = loss.detach() if before is None else before + loss.detach()
    return apply_step(loss, params, clip, optimizers, scaler, clip_fn, before)


class Trainer:
    def __init__(self, cfg: C.Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        meta = None
        if not cfg.data.synthetic:
            if cfg.data.labels and not (Path(cfg.data.labels) / "meta.json").is_file():
                raise MLCDError(f"config key 'data.labels': {cfg.data.labels}/meta.json not found "
                                "(is this a folder written by `mlcd assign`?)")
            meta = labels_meta(cfg.data.labels) if cfg.data.labels else None
        self.labels_id = labels_identity(cfg.data.labels) if meta is not None else None
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

    def _build_data(self, start_step: int):
        cfg = self.cfg
        if cfg.data.synthetic:
            return SyntheticBatches(cfg.data.synthetic_batches, self.batch, self.image_size, cfg.loss.num_classes,
                                    cfg.loss.l, cfg.seed, self.info.rank, start=start_step)
        loader, ds = build_shard_loader(cfg, self.info.rank, self.info.world_size, self.batch, start_step,
                                        self.image_size, pin_memory=self.info.device.type == "cuda",
                                        positions=self.positions or None)
        return iter(loader)

    def _check_data(self):
        """Rank 0 checks the label folder against the shards; every rank raises its verdict."""
        cfg, info = self.cfg, self.info
        if cfg.data.synthetic:
            return
        err = None
        if info.is_main:
            try:
                from mlcd_train.data.reader import list_shards

                shards = list_shards(cfg.data.shards)
                if not shards:
                    raise MLCDError(f"config key 'data.shards': no shards found in {cfg.data.shards}")
                sizes_path = Path(cfg.data.shards) / "sizes.json"
                sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else None
                check_labels(shards, cfg.data.labels, sizes, cfg.loss.l, cfg.data.check_keys_shards)
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
        elif self.sharded_ckpt:
            raise MLCDError(f"{folder}: a train.parallel=ddp checkpoint (model.pt); resume it with "
                            "train.parallel=ddp, or start an fsdp run from its backbone with init.checkpoint")
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
        if st["world_size"] == info.world_size and not changed and st.get("positions"):
            self.positions = {int(w): int(n) for w, n in st["positions"][info.rank].items()}
        return st

    def _stream_settings(self) -> dict:
        """What the position and order of the data stream depend on, besides the step."""
        d = self.cfg.data
        return {"batch_per_rank": self.batch, "seed": self.cfg.seed, "num_workers": d.num_workers,
                "shuffle_buffer": d.shuffle_buffer}

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
        positions = gather_objects(dict(self.positions), info)
        local_corrupt = sum(c for c, _ in self.worker_stats.values())
        self.corrupt_total = self.corrupt_offset + int(all_sum([float(local_corrupt)], info)[0])
        if info.is_main:
            state = {"step": step, "samples_seen": step * self.cfg.train.global_batch_size,
                     "world_size": info.world_size, **self._stream_settings(), "labels": self.labels_id,
                     "data_batches_consumed": step * self.cfg.train.accum_steps, "skipped_steps": self.skipped,
                     "corrupt": self.corrupt_total, "rng": rngs, "positions": positions,
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
        self._build_pfc(emb)
        self.fsdp = par.uses_fsdp(cfg, info)  # the backbone is sharded (fsdp on more than one rank)
        self.sharded_ckpt = cfg.train.parallel == "fsdp"  # DCP checkpoints, on one process too
        self.scaler = make_scaler(cfg.train.precision, info.device)
        if info.is_main and cfg.train.precision != "fp32" and info.device.type != "cuda":
            print(f"mlcd train: train.precision={cfg.train.precision} runs in fp32 on the CPU "
                  "(autocast and loss scaling are for CUDA)", file=sys.stderr)
        self.skipped, self.corrupt_total, self.corrupt_offset = 0, 0, 0
        self.saved: set[int] = set()
        self.worker_stats: dict[int, tuple[int, int]] = {}
        # {original loader worker: records it has consumed} of this rank, from the batches taken:
        # saved with each checkpoint so that a resume is exact even past corrupt samples
        self.positions: dict[int, int] = {}
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
        data = self._build_data(start * cfg.train.accum_steps)  # in micro-batches
        log = MetricsLog(self.out, start, info.is_main)
        stop = StopFlag()
        stop.install()
        try:
            return self._loop(data, start, total, log, stop)
        finally:
            stop.restore()
            log.close()
            # Stop the loader workers now: they ignore SIGTERM (so that a preemption signal to
            # the process group cannot kill them mid-step), so leaving them to Python's exit
            # handlers would block until the launcher's SIGKILL.
            shutdown = getattr(data, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _loop(self, data, start: int, total: int, log: MetricsLog, stop: StopFlag) -> int:
        from mlcd_train.utils.progress import progress

        cfg, info = self.cfg, self.info
        dev = info.device
        amp = autocast_context(cfg.train.precision, dev)
        params = [p for p in self.core.parameters() if p.requires_grad]
        clip = cfg.optim.clip_grad_norm
        clip_fn = None
        if self.fsdp:
            from mlcd_train.trainer.parallel import clip_grad_norm_ as clip_fn  # the norm over every shard
        opts = [(self.opt, cfg.optim.lr), (self.pfc_opt, self.pfc_lr)]
        nonfinite_run = 0
        # a bar on a terminal; plain lines (one per log step) in batch logs, where \r updates pile up
        self.lines = (info.is_main and not sys.stderr.isatty() and os.environ.get("MLCD_QUIET", "0") != "1")
        self.t_start, self.start_step = time.perf_counter(), start
        bar = progress(total=total, initial=start, desc="train", unit="step", rank=info.rank,
                       disable=True if self.lines else None)
        win_t0, win_wait, win_steps = time.perf_counter(), 0.0, 0
        win_loss, win_norm, win_good = 0.0, 0.0, 0  # sums over the window's finite steps
        step = start
        accum = cfg.train.accum_steps
        while step < total:
            micro = []
            for _ in range(accum):  # accum_steps micro-batches make one optimiser step
                t0 = time.perf_counter()
                batch = next(data)
                win_wait += time.perf_counter() - t0
                if len(batch) > 2:  # (worker, corrupt, records, original worker, position) of its loader worker
                    self.worker_stats[int(batch[2][-1])] = (int(batch[3][-1]), int(batch[4][-1]))
                    self.positions[int(batch[5][-1])] = int(batch[6][-1])
                micro.append((batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)))
            factor = lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
            set_lr(opts, factor)
            # negative sampling and any other torch randomness: a function of (seed, step, rank)
            torch.manual_seed(mix_seed(cfg.seed, step, info.rank))
            self.pfc.generator.manual_seed(mix_seed(cfg.seed, step, info.rank, 0xFC))
            loss_v, gnorm_v, applied = accumulate_step(self.model, self.pfc, micro, params, clip,
                                                       (self.opt, self.pfc_opt), amp, self.scaler, clip_fn)
            if applied:
                nonfinite_run = 0
                win_loss += loss_v
                win_norm += gnorm_v
                win_good += 1
            else:
                self.skipped += 1
                nonfinite_run += 1
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise MLCDError(f"train: loss or gradient norm not finite for {nonfinite_run} steps in a row "
                                    f"(step {step + 1}; limit train.max_nonfinite_steps="
                                    f"{cfg.train.max_nonfinite_steps}); lower optim.lr or check the data. "
                                    f"The last checkpoint in {self.ckdir} is intact.")
            self.opt.zero_grad(set_to_none=True)
            self.pfc_opt.zero_grad(set_to_none=True)
            step += 1
            win_steps += 1
            bar.update(1)
            stopping, written = agree_stop(stop.signum != 0, info,
                                           self.pending is None or self.pending[2].done())
            if self.pending is not None and written:
                self._finish_pending(wait=True)  # every rank's write is done: wait() returns at once
            if step % cfg.train.log_every == 0 or step == total or stopping:
                self._log(log, bar, step, total, factor, win_t0, win_wait, win_steps, win_loss, win_norm,
                          win_good)
                win_t0, win_wait, win_steps = time.perf_counter(), 0.0, 0
                win_loss, win_norm, win_good = 0.0, 0.0, 0
            if cfg.eval.every > 0 and not stopping and (step % cfg.eval.every == 0 or step == total):
                self._evaluate(log, step)
            if stopping or step % cfg.train.save_every == 0 or step == total:
                self._save(step)
                win_t0 = time.perf_counter()  # img/s measures training, not saving
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

    def _log(self, log, bar, step, total, factor, t0, wait, nsteps, loss_sum, norm_sum, good):
        """One log record; loss and grad norm are means over the ``good`` (finite, applied) steps
        of the window, NaN when it had none."""
        cfg, info = self.cfg, self.info
        dt = max(time.perf_counter() - t0, 1e-9)
        if good == 0:
            loss_sum = norm_sum = float("nan")
        good = max(1, good)
        corrupt = sum(c for c, _ in self.worker_stats.values())
        loss_m, norm_m, wait, corrupt = all_sum([loss_sum / good, norm_sum / good, wait / dt, float(corrupt)], info)
        ws = info.world_size
        self.corrupt_total = self.corrupt_offset + int(corrupt)
        rec = {"step": step, "loss": loss_m / ws, "lr": cfg.optim.lr * factor,
               "img_per_s": nsteps * cfg.train.global_batch_size / dt, "data_wait": wait / ws,
               "grad_norm": norm_m / ws, "skipped_steps": self.skipped, "corrupt_samples": self.corrupt_total,
               "samples_seen": step * cfg.train.global_batch_size}
        log.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}",
                        wait=f"{rec['data_wait']:.1%}", refresh=False)
        if self.lines:
            el = time.perf_counter() - self.t_start
            eta = el / max(1, step - self.start_step) * (total - step)
            print(f"train step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
                  f"{rec['img_per_s']:.0f} img/s data-wait {rec['data_wait']:.1%} grad-norm {rec['grad_norm']:.3g} "
                  f"skipped {self.skipped} elapsed {el / 60:.1f} min ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    from mlcd_train.cli import run_stage

    sys.exit(run_stage("train", sys.argv[1:]))
