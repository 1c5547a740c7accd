"""One training step, without host synchronisation.

- :class:`Batch`: what the loader hands the step (images, labels; typed, not a tuple).
- :func:`apply_step`: backward, gradient clipping, and every optimiser's step applied only
  when the loss and the gradient norm are finite.  The decision is a device flag: the fused
  AdamW of torch takes it as ``found_inf`` (the kernel skips the update and undoes the step
  count, as under a GradScaler), the Partial FC optimiser keeps its sampled rows as they were
  (``found_inf`` too), any other optimiser is stepped and then its parameters and state are
  put back with ``torch.where`` (a copy of them per step: the CPU / foreach path).  An fp16
  GradScaler unscales, and its ``update`` lowers the scale from the device flags; its ``step``
  (which reads the flag on the host) is not used.  With ``sync=True`` the figures come back as
  Python numbers.
- :class:`StepStats`: the window's sums (loss, grad norm, applied steps), the skipped steps and
  the run of non-finite steps, all on the device; :meth:`StepStats.read` is the one transfer,
  made on log steps and every ``train.stop_check_every`` steps.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One (micro-)batch of this rank: ``images`` [B, 3, H, W], ``labels`` [B, l] (int64)."""
    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = True, channels_last: bool = False) -> "Batch":
        images = self.images.to(device, non_blocking=non_blocking)
        if channels_last:  # train.channels_last: the same values, NHWC strides
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, self.labels.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or a DTensor's local shard (FSDP2 parameters and their state)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def supports_found_inf(opt) -> bool:
    """torch's fused Adam / AdamW skip their update on a ``found_inf`` tensor; so does ours."""
    from mlcd_train.partial_fc import PartialFCOptimizer

    if isinstance(opt, PartialFCOptimizer):
        return True
    return bool(getattr(opt, "_step_supports_amp_scaling", False)) and bool(opt.defaults.get("fused"))


def _verdict_on(ok: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``ok`` on ``device``: a copy from a GPU to the CPU (a non-fused optimiser's CPU step
    count) waits for the value (a non-blocking one could be read before it lands)."""
    return ok.to(device, non_blocking=device.type != "cpu")


def guarded_step(opt, ok: torch.Tensor) -> None:
    """``opt.step()`` when ``ok`` (a 0-d bool tensor), else leave the parameters and the state
    as they were; without reading ``ok`` on the host."""
    if supports_found_inf(opt):
        opt.found_inf = (~ok).to(torch.float32)
        try:
            opt.step()
        finally:
            del opt.found_inf
        return
    saved = []  # (tensor, copy before the step or None: a state the step creates)
    plain = {}  # non-tensor state (apex's int step counts): restored after one read of ok
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            saved.append((_local(p), _local(p).detach().clone()))
            st = opt.state.get(p, {})
            for key, v in st.items():
                if torch.is_tensor(v):
                    saved.append((_local(v), _local(v).detach().clone()))
                else:
                    plain[(id(p), key)] = v
    fresh = [p for g in opt.param_groups for p in g["params"] if p.grad is not None and not opt.state.get(p)]
    opt.step()
    with torch.no_grad():
        for cur, old in saved:
            keep = _verdict_on(ok, cur.device)
            cur.copy_(torch.where(keep, cur, old))
        for p in fresh:  # state created by this step: back to its initial zeros when skipped
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v):
                    v = _local(v)
                    v.copy_(torch.where(_verdict_on(ok, v.device), v, torch.zeros_like(v)))
        if plain and not bool(ok):
            for group in opt.param_groups:
                for p in group["params"]:
                    for (pid, key), v in plain.items():
                        if pid == id(p):
                            opt.state[p][key] = v


def scaler_found_inf(scaler, optimizers) -> list:
    """The overflow flags (0-d float tensors, 1 = inf/nan found) that ``scaler.unscale_`` recorded
    for ``optimizers`` this step, the tensors ``scaler.update()`` reads."""
    from mlcd_core.errors import MLCDError

    states = getattr(scaler, "_per_optimizer_states", None)
    out = []
    for opt in optimizers:
        found = states.get(id(opt), {}).get("found_inf_per_device") if isinstance(states, dict) else None
        if not isinstance(found, dict):
            raise MLCDError("train.precision=fp16: this torch's GradScaler keeps its overflow flags elsewhere "
                            f"(torch {torch.__version__}); use train.precision=bf16 or fp32")
        out.extend(v for v in found.values() if torch.is_tensor(v))
    return out


def _agreed_overflow(flags: list, device: torch.device) -> torch.Tensor:
    """1.0 when any flag of any rank is set, else 0.0, on the device, written back into every
    flag: ranks skip together and ``scaler.update()`` moves every rank's scale alike (the
    Partial FC centres' gradient is the rank's own, never averaged, so its flag can differ)."""
    import torch.distributed as dist

    found = torch.stack([f.to(device, non_blocking=True).float().reshape(()) for f in flags]).amax() \
        if flags else torch.zeros((), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    for f in flags:
        f.copy_(found.to(f.device, non_blocking=True))
    return found


def apply_step(loss: torch.Tensor, params: list, clip: float, optimizers, scaler=None,
               clip_fn=None, loss_before: torch.Tensor | None = None, sync: bool = True):
    """Backward, clip the backbone gradient, step every optimiser: (loss, grad norm, applied).

    The step is applied only when the loss and the (unscaled) backbone gradient norm are
    finite; that is the one decision every rank takes alike (DDP has averaged the gradient,
    the loss is the global mean).  ``sync=False``: the three come back as device tensors and
    nothing is read on the host.  With a ``scaler`` (fp16) the scaled loss is backpropagated
    and every optimiser's gradients are unscaled before clipping, so the norm is the true
    one: an overflow of the scaled gradient (the norm, or the flag ``unscale_`` records for any
    optimiser on any rank, agreed by an all-reduce on the device) skips the step like any other
    non-finite step, and ``scaler.update()`` lowers every rank's scale alike.  Neither reads
    anything on the host (the scaler's own ``step`` would: it reads the overflow flag unless
    the optimiser is a fused one)."""
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # records each optimiser's overflow flag on the device
    gnorm = (clip_fn or torch.nn.utils.clip_grad_norm_)(params, clip if clip > 0 else float("inf"))
    total = loss.detach() if loss_before is None else loss.detach() + loss_before
    if not torch.is_tensor(gnorm):
        gnorm = torch.tensor(float(gnorm), device=total.device)
    ok = torch.isfinite(total) & torch.isfinite(gnorm.to(total.device))
    if scaler is not None:  # an overflow outside the clipped parameters too, on any rank
        ok = ok & (_agreed_overflow(scaler_found_inf(scaler, optimizers), ok.device) == 0)
    for opt in optimizers:
        guarded_step(opt, ok)
    if scaler is not None:
        scaler.update()  # from the flags unscale_ recorded: on the device, no read
    if sync:
        return float(total), float(gnorm), bool(ok)
    return total, gnorm, ok


def accumulate_step(model, pfc, micro: list, params: list, clip: float, optimizers, amp=None, scaler=None,
                    clip_fn=None, sync: bool = True):
    """One optimiser step over the micro-batches (:class:`Batch` or ``(images, labels)``) of
    this rank: exactly the step of their concatenation (train.accum_steps).  The Partial FC's
    sampled classes are drawn once from the labels of all of them (``pfc.plan``), each micro
    loss is scaled by 1 / len(micro) so the summed gradient is the full batch's mean-loss
    gradient; DDP reduces only the last micro-batch's (accumulated) gradient.  Returns
    apply_step's."""
    micro = [(b.images, b.labels) if isinstance(b, Batch) else b for b in micro]
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
    return apply_step(loss, params, clip, optimizers, scaler, clip_fn, before, sync=sync)


class StepStats:
    """Counters of the steps since the last read, kept on the device (no transfer per step):
    sums of the loss and grad norm over applied steps, applied and skipped steps, the current
    run of non-finite steps and the longest run since the last read."""

    LOSS, NORM, GOOD, SKIPPED, RUN, WORST = range(6)

    def __init__(self, device: torch.device):
        self.t = torch.zeros(6, dtype=torch.float64, device=device)

    def update(self, loss, gnorm, ok) -> None:
        if not torch.is_tensor(ok):  # figures read on the host (apply_step(sync=True)): the same bookkeeping
            dev = self.t.device
            loss, gnorm, ok = (torch.tensor(float(loss), device=dev), torch.tensor(float(gnorm), device=dev),
                               torch.tensor(bool(ok), device=dev))
        okf = ok.to(self.t.device, torch.float64)
        zero = torch.zeros((), dtype=torch.float64, device=self.t.device)
        upd = torch.stack([torch.where(ok, loss.double(), zero), torch.where(ok, gnorm.double(), zero), okf,
                           1.0 - okf])
        self.t[:4] += upd
        run = (self.t[self.RUN] + 1.0) * (1.0 - okf)
        self.t[self.RUN] = run
        self.t[self.WORST] = torch.maximum(self.t[self.WORST], run)

    def read(self) -> dict:
        """The counters (one device-to-host transfer); the window sums, skipped count and the
        longest run restart (the current run carries on)."""
        v = self.t.tolist()
        self.t[:4] = 0.0
        self.t[self.WORST] = self.t[self.RUN]
        return {"loss_sum": v[0], "norm_sum": v[1], "good": int(v[2]), "skipped": int(v[3]), "run": int(v[4]),
                "worst_run": int(v[5])}
