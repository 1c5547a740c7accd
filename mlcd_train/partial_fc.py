"""Partial FC: class centres sharded over ranks, sampled negatives, MLCD margin losses.

API (what the trainer uses)::

    pfc = PartialFC(embedding_size, num_classes, sample_rate=0.1, scale=64.0, margin=0.3,
                    margin_type="arc", loss="mlcd", seed=0, group=None, device=None)
    loss = pfc(local_embeddings, local_labels)     # [B, d] float, [B, l] or [B] int (-1 = padding)
    opt = pfc.make_optimizer(lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                             kind="adamw", momentum=0.0)   # -> PartialFCOptimizer
    opt.zero_grad(); loss.backward(); opt.step()   # lr: opt.param_groups[0]["lr"]
    save_partial_fc(pfc, path, optimizer=None)     # this rank's shard; name: shard_file_name(rank)
    load_partial_fc(pfc, sources, optimizer=None)  # sources: folder of pfc_rank*.pt or list of
                                                    # files, saved with ANY number of ranks
    pfc.generator                                  # the sampling torch.Generator (weight's device)
    pfc.plan(labels_of_all_micro_batches)          # gradient accumulation: fix the sampled classes
                                                    # of the forwards up to the optimiser's next step
    pfc.last_index                                 # local rows sampled by the last forward (None = all)
    pfc.check_inputs = False; pfc.step_tag = step  # no host-read input check (see below); default True
    class_range(num_classes, world_size, rank)     # -> (class_start, num_local)

* Rank r of W owns the contiguous classes ``pfc.class_start .. pfc.class_start + pfc.num_local``
  (``class_range(num_classes, W, r)``: k // W each, the first k % W ranks one more) in
  ``pfc.weight`` [num_local, d].  Without a process group it is one rank owning every class.
* ``forward`` all-gathers embeddings (gradient-correct, see below) and labels; every rank
  keeps every class positive for some sample of the global batch plus random negatives up to
  ``int(sample_rate * num_local)`` (``pfc.generator``, seeded ``seed * 1000003 + rank``), redrawn each
  step; ``sample_rate >= 1`` uses all classes.  A class positive for one sample is a negative
  for the others.  Repeated labels in a row count once.  Every rank returns the same loss,
  the mean over the global batch, computed in fp32 (fp64 when the inputs are fp64) whatever
  autocast says.
* Losses (the registry of mlcd_train/losses.py), with cos_j = <e/|e|, w_j/|w_j|>, s = scale,
  P = positives of the sample (labels >= 0), N' = sampled classes not in P:
    mlcd:   log(1 + sum_P exp(-s phi(cos_i))) + log(1 + sum_N' exp(s cos_j))
    mlc:    log(1 + sum_N' exp(s cos_j) * sum_P exp(-s phi(cos_i)))   (paper Eq. 4; the margin
            is applied to the positives as in mlcd so the two differ only by the decoupling;
            margin=0 gives Eq. 4 exactly as printed)
    unicom: -log(exp(s phi(cos_y)) / (exp(s phi(cos_y)) + sum_N' exp(s cos_j))), y = labels[:, 0]
            (the other label columns are ignored: they are neither positive nor excluded)
  phi: "arc" cos(theta + m), with ArcFace's guard: where theta + m > pi (cos < cos(pi - m))
  phi = cos - m * sin(m), which keeps phi decreasing in theta; "cos" cos - m.
  Sums over classes on other ranks go through max-stabilised all-reduces (a log-sum-exp
  across ranks).  The [global batch, sampled] logits are never stored: they are computed in
  column chunks in forward and recomputed in backward; the one large temporary is the dense
  [num_local, d] weight gradient (zero on unsampled rows).
* Gradient scale: the embedding gradient returned to each rank is world_size x d(loss)/d(its
  embeddings), so the usual DDP gradient averaging of the backbone gives exactly the gradient
  of the global-mean loss (one step on W ranks == one step on 1 rank with the whole batch).
  ``pfc.weight`` is not averaged by anyone: do not wrap PartialFC in DDP.
* Input errors (label outside [-1, num_classes), wrong label shape, batch or label width that
  differs across ranks, wrong embedding size) are decided collectively and raise MLCDError on
  every rank, never a hang.  That check reads an all-gathered vector on the host (a host
  sync).  ``pfc.check_inputs = False`` (the trainer: every step but its first and its sync
  points) skips it for calls whose inputs have the structure (shapes, dtypes, devices) of the
  last checked call of their kind (forward / plan; compared on the host, a change raises on
  that rank): their label range goes into a device record that the next checking call
  all-gathers and reports, the same one-line MLCDError on every rank, naming the unchecked
  calls by ``pfc.step_tag`` (or a count of calls).  Out-of-range labels in between are
  harmless: they are outside every rank's class range and count as padding.
* Host syncs left in a forward without the check: none at ``sample_rate`` 1 (the logits
  kernel works on the dense [N, l] label slots, no list of the positive pairs); none below 1
  when the gathered batch has at most num_sample label slots (every positive fits: a
  fixed-size draw over a mask of the positives); otherwise the sampling selects the positives
  (boolean mask, ``torch.unique``): the sampled set has max(num_sample, positives) rows, a
  size the data decides (a fixed-size index would have to cover the global batch's labels, at
  scale the whole shard).  See docs/architecture.md.
* ``PartialFCOptimizer`` (``make_optimizer``) updates only the rows sampled since its last
  step (row-wise AdamW with per-row step counts, or SGD with momentum); rows not sampled keep
  their weight and optimiser state bit for bit.  Its state lives with the shard.  Its
  ``zero_grad`` also forgets the rows of forwards not followed by a step (a skipped step);
  several forwards before one step (gradient accumulation) update the union of their rows.
* ``plan(labels)`` (collective) draws the sampled set once from the labels of every
  micro-batch of a step (this rank's rows, all ranks gathered); the forwards that follow use
  it (their positives are in it) until the optimiser's step or zero_grad.  With the micro
  losses scaled by 1 / micro-batches, the summed gradient is the full batch's exactly (same
  positives, same negatives, same random draw).  Plain
  ``torch.optim`` optimisers over ``pfc.parameters()`` also work (the gradient of unsampled
  rows is zero, but weight decay / momentum then move them).
* ``pfc.state_dict()`` carries num_classes, world_size, rank, class range and embedding
  size (extra state) and only loads into the same layout; ``save_partial_fc`` /
  ``load_partial_fc`` move weights and optimiser state between different numbers of ranks.
"""
from __future__ import annotations

import glob
import math
import os
import re
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlcd_core.errors import MLCDError
from mlcd_core.io import atomic_torch_save, safe_torch_load
from mlcd_train.losses import LOSSES, get_loss, loss_names

FORMAT = "mlcd.partial_fc/1"
_UNCHECKED_EMPTY = [0, -1, -1, 2**62, -2**62, 0]
MARGINS = ("arc", "cos")
_NORM_EPS = 1e-12
_PAIR_TEMPS = 4  # a positive-pair block holds max_chunk_elems / _PAIR_TEMPS elements (see _pair_blocks)


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``: k // W classes each, the first k % W one more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def shard_file_name(rank: int) -> str:
    return f"pfc_rank{rank}.pt"


# --------------------------------------------------------------------------- collectives

class _AllGatherGrad(torch.autograd.Function):
    """all_gather in forward; backward sums every rank's gradient and keeps this rank's slice,
    multiplied by world_size so that DDP's averaging of the backbone gradient cancels it."""

    @staticmethod
    def forward(ctx, x, group, world_size, rank):
        ctx.group, ctx.world_size, ctx.rank, ctx.n = group, world_size, rank, x.shape[0]
        return _all_gather(x, group, world_size)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        n, r = ctx.n, ctx.rank
        return grad[r * n:(r + 1) * n] * ctx.world_size, None, None, None


def _all_gather(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, 0)


def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp whose value and gradient are finite-or--inf (no NaN) for all -inf rows."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(x - m).sum(dim)
    ok = total > 0
    out = m.squeeze(dim) + torch.log(torch.where(ok, total, torch.ones_like(total)))
    return torch.where(ok, out, torch.full_like(out, -math.inf))


# --------------------------------------------------------------------------- the logits kernel

class _SampledLogSumExp(torch.autograd.Function):
    """For normalised embeddings e_n [N, d] and this rank's centres ``weight`` [num_local, d]
    restricted to the sampled rows ``index`` (None = all rows), returns

    lse [N]: log sum_{j sampled, not positive} exp(scale * cos_ij) (-inf when no such j), and
    cos_pos [N, l]: cos of the positive pairs (i, sampled column pos_cols[i, k]) (0 where < 0).

    The logits are built column chunk by column chunk and recomputed in backward, so memory is
    O(N * chunk), never O(N * sampled); the positives' cosines run in sample blocks of
    [block, l, d] gathered centres (``_pair_blocks``); backward writes the weight gradient straight into one
    dense [num_local, d] tensor (zero on unsampled rows).  Centre normalisation is folded
    into the logits (cos = (e_n . w) / |w|) and differentiated by hand:
    d/dw_j = (g_j - (sum_i dcos_ij cos_ij) w_j / |w_j|^2) with g_j = sum_i dcos_ij e_i / |w_j|."""

    @staticmethod
    def _chunk(weight, index, c0, c1, dtype):
        w = weight[c0:c1] if index is None else weight.index_select(0, index[c0:c1])
        w = w.to(dtype)
        norm = torch.linalg.vector_norm(w, dim=1)
        inv = 1.0 / norm.clamp(min=_NORM_EPS)
        return w, inv, norm > _NORM_EPS

    @staticmethod
    def _mask_positives(z, pos_cols, c0, c1):
        """z[i, pos_cols[i, k] - c0] = -inf for the positives in columns [c0, c1), in place.
        A scatter of a minimum over the dense [N, l] slots (+inf for a slot elsewhere leaves z
        as it was): no list of the positives, whose length only the data knows (a host sync)."""
        sel = (pos_cols >= c0) & (pos_cols < c1)
        idx = torch.where(sel, pos_cols - c0, torch.zeros_like(pos_cols))
        val = torch.full(pos_cols.shape, math.inf, dtype=z.dtype, device=z.device).masked_fill_(sel, -math.inf)
        z.scatter_reduce_(1, idx, val, reduce="amin")

    @staticmethod
    def _pair_blocks(n, l, d, max_elems):
        """Sample blocks [s0, s1) of max_elems // (PAIR_TEMPS l d) samples (at least one): a block's
        backward holds about 6.5 [block, l, d]-sized tensors at once (the gathered centres, their
        normalised copy, the product and their gradients; measured), so blocks of max_elems / 4
        elements keep its peak below the column chunks' (about 4 x max_elems)."""
        b = max(1, max_elems // max(1, _PAIR_TEMPS * l * d))
        return [(s0, min(n, s0 + b)) for s0 in range(0, n, b)]

    @staticmethod
    def _cos_pairs(e_rows, w_rows):
        """cos of the (sample, slot) pairs of a block: e_rows [b, d], w_rows [b, l, d] -> [b, l]."""
        return (F.normalize(w_rows, dim=2, eps=_NORM_EPS) * e_rows.unsqueeze(1)).sum(2)

    @staticmethod
    def _pair_rows(pos_cols, index):
        """Local centre row of every (sample, slot), a valid row where the slot has no positive here
        (the first sampled one: the reads of the gathers hit one row, which caches well)."""
        col = pos_cols.clamp(min=0)
        return col if index is None else index[col]

    @staticmethod
    def _pair_targets(pos_cols, rows, num_rows):
        """Rows that receive the pairs' weight gradient in ``index_add_``: a slot without a
        positive here (padding, or a class of another rank: most slots at W ranks) adds an
        exact no-op (-0.0, see backward) to row (its flat slot number mod num_rows), so such
        slots land on different rows instead of all on one (whose atomic adds a GPU serialises)."""
        spread = torch.arange(pos_cols.numel(), device=pos_cols.device).view(pos_cols.shape) % num_rows
        return torch.where(pos_cols >= 0, rows, spread)

    @staticmethod
    def forward(ctx, e_n, weight, index, pos_cols, scale, chunk, max_elems):
        n = e_n.shape[0]
        cols_total = weight.shape[0] if index is None else index.numel()
        lse = torch.full((n,), -math.inf, dtype=e_n.dtype, device=e_n.device)
        for c0 in range(0, cols_total, chunk):
            c1 = min(cols_total, c0 + chunk)
            w, inv, _ = _SampledLogSumExp._chunk(weight, index, c0, c1, e_n.dtype)
            z = (e_n @ w.t()).mul_(inv.mul_(scale))
            _SampledLogSumExp._mask_positives(z, pos_cols, c0, c1)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            del w, z
        # cos of every (sample, slot) pair, 0 where the slot has no positive on this rank: dense
        # [N, l] work (N x l centre rows gathered, ~W x the pairs that live here) instead of a
        # list of the pairs (nonzero: a host sync)
        cos_pos = torch.zeros(pos_cols.shape, dtype=e_n.dtype, device=e_n.device)
        if cols_total:
            valid = pos_cols >= 0
            rows = _SampledLogSumExp._pair_rows(pos_cols, index)
            for s0, s1 in _SampledLogSumExp._pair_blocks(n, pos_cols.shape[1], weight.shape[1], max_elems):
                c = _SampledLogSumExp._cos_pairs(e_n[s0:s1], weight[rows[s0:s1]].to(e_n.dtype))
                cos_pos[s0:s1] = torch.where(valid[s0:s1], c, torch.zeros_like(c))
        ctx.save_for_backward(e_n, weight, index, lse, pos_cols)
        ctx.scale, ctx.chunk, ctx.max_elems = scale, chunk, max_elems
        return lse, cos_pos

    @staticmethod
    def backward(ctx, g_lse, g_pos):
        e_n, weight, index, lse, pos_cols = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        cols_total = weight.shape[0] if index is None else index.numel()
        grad_e = torch.zeros_like(e_n)
        grad_w = None
        if ctx.needs_input_grad[1]:  # every row is written below when all are sampled
            grad_w = torch.zeros_like(weight) if index is not None or g_lse is None else torch.empty_like(weight)
        if g_lse is not None:
            finite = torch.isfinite(lse)
            coef = torch.where(finite, g_lse, torch.zeros_like(g_lse)).mul(scale).unsqueeze(1)
            lse_safe = torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(1)
            for c0 in range(0, cols_total, chunk):
                c1 = min(cols_total, c0 + chunk)
                w, inv, unclamped = _SampledLogSumExp._chunk(weight, index, c0, c1, e_n.dtype)
                cos = (e_n @ w.t()).mul_(inv)
                z = cos * scale
                _SampledLogSumExp._mask_positives(z, pos_cols, c0, c1)
                dcos = torch.exp_(z.sub_(lse_safe)).mul_(coef)       # d loss / d cos_ij, [N, C]
                del z
                proj = (dcos * cos).sum(0)                           # sum_i dcos_ij cos_ij
                ds = dcos.mul_(inv)                                  # d loss / d (e_n . w_j)
                grad_e.addmm_(ds, w)
                if grad_w is not None:
                    gw = ds.t() @ e_n
                    gw.addcmul_(w, (proj * inv * inv * unclamped).unsqueeze(1), value=-1.0)
                    gw = gw.to(grad_w.dtype)
                    if index is None:
                        grad_w[c0:c1] = gw
                    else:
                        grad_w.index_copy_(0, index[c0:c1], gw)
                del w, cos, dcos, ds
        if g_pos is not None and cols_total:
            valid = pos_cols >= 0
            g_pos = torch.where(valid, g_pos, torch.zeros_like(g_pos))  # slots without a positive here: 0
            rows = _SampledLogSumExp._pair_rows(pos_cols, index)
            targets = _SampledLogSumExp._pair_targets(pos_cols, rows, weight.shape[0])
            for s0, s1 in _SampledLogSumExp._pair_blocks(e_n.shape[0], pos_cols.shape[1], weight.shape[1],
                                                         ctx.max_elems):
                r = rows[s0:s1]
                with torch.enable_grad():
                    ed = e_n[s0:s1].detach().requires_grad_()
                    wp = weight.detach()[r].to(e_n.dtype).requires_grad_()
                    cos = _SampledLogSumExp._cos_pairs(ed, wp)
                ge, gwp = torch.autograd.grad(cos, (ed, wp), g_pos[s0:s1])
                grad_e[s0:s1] += ge
                if grad_w is not None:
                    # slots without a positive here: -0.0, the exact identity of a float add (their
                    # gradient is already +-0 through g_pos = 0, +0.0 would turn a -0.0 row into +0.0)
                    gwp = torch.where(valid[s0:s1].unsqueeze(2), gwp, -0.0).to(grad_w.dtype)
                    grad_w.index_add_(0, targets[s0:s1].reshape(-1), gwp.reshape(-1, gwp.shape[-1]))
        return grad_e, grad_w, None, None, None, None, None


# --------------------------------------------------------------------------- the module

class PartialFC(nn.Module):
    """Sharded class centres with negative sampling and the MLCD / MLC / Unicom losses.

    See the module docstring.  ``rank`` / ``world_size`` default to the process group's
    (``group`` or the default group; one rank when none is initialised); they can be given
    explicitly to build a shard offline (resharding, tests), but ``forward`` with
    world_size > 1 needs the process group.  ``max_chunk_elems`` bounds the temporaries of one
    column chunk (global batch x columns and columns x d; default 2**21 on CPU, 2**26 on CUDA)
    and, over 4, those of one block of the positives' cosines ([block, l, d]).
    """

    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 0.1,
                 scale: float = 64.0, margin: float = 0.3, margin_type: str = "arc",
                 loss: str = "mlcd", seed: int = 0, group=None, rank: int | None = None,
                 world_size: int | None = None, device=None, dtype=torch.float32,
                 init_std: float = 0.01, max_chunk_elems: int | None = None):
        super().__init__()
        if loss not in LOSSES:  # the registry of mlcd_train/losses.py
            raise MLCDError(f"PartialFC loss: {loss!r} is not one of {loss_names()}")
        if margin_type not in MARGINS:
            raise MLCDError(f"PartialFC margin_type: {margin_type!r} is not one of {MARGINS}")
        if not (0.0 < sample_rate <= 1.0):
            raise MLCDError(f"PartialFC sample_rate: {sample_rate} must be in (0, 1]")
        if embedding_size < 1 or num_classes < 1:
            raise MLCDError(f"PartialFC: embedding_size {embedding_size} and num_classes {num_classes} must be >= 1")
        initialised = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size(group) if initialised else 1
        if rank is None:
            rank = dist.get_rank(group) if initialised else 0
        if not 0 <= rank < world_size:
            raise MLCDError(f"PartialFC: rank {rank} outside world size {world_size}")
        if num_classes < world_size:
            raise MLCDError(f"PartialFC num_classes: {num_classes} classes cannot be split over {world_size} ranks")
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.scale, self.margin = float(sample_rate), float(scale), float(margin)
        self.margin_type, self.loss_type = margin_type, loss
        self.loss_fn = get_loss(loss)
        self.group, self.rank, self.world_size = group, int(rank), int(world_size)
        self.class_start, self.num_local = class_range(self.num_classes, self.world_size, self.rank)
        if max_chunk_elems is None:  # bounds [batch, chunk] and [chunk, d] temporaries: 8 MB CPU, 256 MB GPU
            max_chunk_elems = 1 << (26 if torch.device(device if device is not None else "cpu").type == "cuda" else 21)
        self.max_chunk_elems = int(max_chunk_elems)
        self.seed = int(seed)
        gen = torch.Generator(device=device if device is not None else "cpu")
        gen.manual_seed(self.seed * 1_000_003 + self.rank)
        weight = torch.empty(self.num_local, self.embedding_size, device=device, dtype=dtype)
        weight.normal_(0.0, init_std, generator=gen)
        self.weight = nn.Parameter(weight)
        self._generator: torch.Generator | None = None
        self._pending: list[torch.Tensor | None] = []   # sampled rows since the optimiser's last step
        self._planned: tuple | None = None               # (index,) fixed by plan() until the next step
        self.last_index: torch.Tensor | None = None      # rows sampled by the last forward (None = all)
        # input checks (see _validate): every call validates unless check_inputs is False
        self.check_inputs = True
        self.step_tag: int | None = None                 # names unchecked calls in errors (the trainer's step)
        self._calls = 0                                  # forward / plan calls, the default tag
        self._checked: dict[str, tuple] = {}             # kind -> input signature of its last validated call
        self._tags_are_steps = False
        # labels of unchecked calls, on the device: [range-bad calls, first tag, last tag, min, max,
        # calls with -1 in labels[:, 0] (single-positive losses)]; read by the next validating call
        self.register_buffer("_unchecked", torch.tensor(_UNCHECKED_EMPTY, dtype=torch.long, device=device),
                             persistent=False)

    # ---- bookkeeping
    @property
    def generator(self) -> torch.Generator:
        """The sampling generator, on the weight's device (re-created, re-seeded, if moved)."""
        dev = self.weight.device
        if self._generator is None or self._generator.device != dev:
            self._generator = torch.Generator(device=dev)
            self._generator.manual_seed(self.seed * 1_000_003 + self.rank)
        return self._generator

    @property
    def num_sample(self) -> int:
        """Classes sampled on this rank when positives are fewer (all when sample_rate >= 1)."""
        if self.sample_rate >= 1.0:
            return self.num_local
        return min(self.num_local, int(self.sample_rate * self.num_local))

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, rank={self.rank}/"
                f"{self.world_size}, classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, scale={self.scale}, margin={self.margin}, "
                f"margin_type={self.margin_type}, loss={self.loss_type}")

    def layout(self) -> dict:
        return {"format": FORMAT, "num_classes": self.num_classes, "embedding_size": self.embedding_size,
                "world_size": self.world_size, "rank": self.rank, "class_start": self.class_start,
                "num_local": self.num_local}

    def get_extra_state(self):
        return self.layout()

    def set_extra_state(self, state):
        mine = self.layout()
        diff = [k for k in mine if state.get(k) != mine[k]] if isinstance(state, dict) else ["format"]
        if diff:
            raise MLCDError(f"PartialFC state_dict: {', '.join(diff)} differ from this shard ({mine}); "
                            "use mlcd_train.partial_fc.load_partial_fc to load shards of another layout")

    def make_optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                       kind: str = "adamw", momentum: float = 0.0) -> "PartialFCOptimizer":
        return PartialFCOptimizer(self, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                  kind=kind, momentum=momentum)

    def checkpoint_state(self, optimizer: "PartialFCOptimizer | None" = None) -> dict:
        """This shard as a dict of plain values and CPU tensors (what save_partial_fc writes)."""
        state = self.layout()
        state["weight"] = self.weight.detach().cpu()
        if optimizer is not None:
            state["optimizer"] = optimizer.shard_state()
        return state

    # ---- forward
    @staticmethod
    def _signature(emb, labels) -> tuple | None:
        """What the collective check decides about the inputs' structure (host metadata only)."""
        if not (torch.is_tensor(emb) and torch.is_tensor(labels)):
            return None
        return (tuple(emb.shape), emb.dtype, emb.device, tuple(labels.shape), labels.dtype, labels.device)

    def _tag(self) -> int:
        self._tags_are_steps = self.step_tag is not None
        return int(self.step_tag) if self.step_tag is not None else self._calls

    def _record_unchecked(self, labels: torch.Tensor) -> None:
        """An unchecked call: fold its label-range verdict into ``_unchecked`` on the device (no
        host read; Python scalars go in as kernel arguments, not host-to-device copies)."""
        tag = self._tag()
        mn, mx = torch.aminmax(labels)
        bad_range = (mn < -1) | (mx >= self.num_classes)
        r = self._unchecked
        if self.loss_fn.single_positive:
            missing = (labels[:, 0] < 0).any()
            bad = bad_range | missing
        else:
            missing, bad = torch.zeros_like(bad_range), bad_range
        r.copy_(torch.stack([r[0] + bad_range.long(), torch.where(bad & (r[1] < 0), tag, r[1]),
                             torch.where(bad, tag, r[2]), torch.where(bad_range, torch.minimum(r[3], mn), r[3]),
                             torch.where(bad_range, torch.maximum(r[4], mx), r[4]), r[5] + missing.long()]))

    def _validate(self, emb: torch.Tensor, labels: torch.Tensor, kind: str = "forward") -> torch.Tensor:
        """Collective input check: every rank raises the same MLCDError, or none does.
        Returns the labels as int64 [B, l].

        With ``check_inputs`` False, a call whose inputs have the structure (shapes, dtypes,
        devices) of the last validated call of its ``kind`` is not checked collectively: its
        label range is folded into a device record (no host read) that the next validating call
        all-gathers and reports (every rank raises the same error, naming the unchecked calls
        by ``step_tag``).  Out-of-range labels in between are harmless: they fall outside every
        rank's class range, so they count as padding.  A call of a kind never validated is
        validated anyway (every rank alike); one whose structure changed raises on its rank."""
        self._calls += 1
        sig = self._signature(emb, labels)
        if not self.check_inputs and kind in self._checked:
            if sig != self._checked[kind]:
                raise MLCDError(f"PartialFC input: the {kind} inputs changed structure since the last validated call "
                                f"({self._checked[kind]} -> {sig}) while check_inputs is off; validate such calls "
                                "(check_inputs=True) on every rank")
            labels = labels.long()
            if labels.dim() == 1:
                labels = labels.unsqueeze(1)
            self._record_unchecked(labels)
            return labels
        problems = {1: "embeddings must be a floating tensor [batch, embedding_size]",
                    2: "labels must be an integer tensor [batch] or [batch, l] with l >= 1",
                    3: "labels and embeddings have different batch sizes",
                    4: "embeddings and labels must be on the weight's device",
                    5: "the local batch is empty"}
        code, detail = 0, ""
        int_types = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
        if not (torch.is_tensor(emb) and emb.is_floating_point() and emb.dim() == 2
                and emb.shape[1] == self.embedding_size):
            code = 1
            detail = (f"got {tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__}, "
                      f"embedding_size {self.embedding_size}")
        elif not (torch.is_tensor(labels) and labels.dtype in int_types and labels.dim() in (1, 2)
                  and (labels.dim() == 1 or labels.shape[1] > 0)):
            code = 2
            detail = f"got {(tuple(labels.shape), labels.dtype) if torch.is_tensor(labels) else type(labels).__name__}"
        elif labels.shape[0] != emb.shape[0]:
            code, detail = 3, f"labels {tuple(labels.shape)}, embeddings {tuple(emb.shape)}"
        elif emb.device != self.weight.device or labels.device != self.weight.device:
            code, detail = 4, f"embeddings on {emb.device}, labels on {labels.device}, weight on {self.weight.device}"
        elif emb.shape[0] == 0:
            code = 5
        dev = self.weight.device
        record = self._unchecked.to(dev)
        if code == 0:
            labels = labels.long()
            if labels.dim() == 1:
                labels = labels.unsqueeze(1)
            shape = torch.tensor(labels.shape, device=dev)
            meta = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), shape,
                              labels.min().reshape(1), labels.max().reshape(1), record])
        else:
            meta = torch.cat([torch.tensor([code, 0, 0, 0, 0], dtype=torch.long, device=dev), record])
        if self.world_size > 1:
            metas = _all_gather(meta.unsqueeze(0), self.group, self.world_size).tolist()
        else:
            metas = [meta.tolist()]
        self._unchecked.copy_(torch.tensor(_UNCHECKED_EMPTY, dtype=torch.long))  # read: the window restarts
        bad = [(r, m[0]) for r, m in enumerate(metas) if m[0]]
        if bad:
            where = "; ".join(f"rank {r}: {problems[c]}" for r, c in bad)
            raise MLCDError(f"PartialFC input: {where}" + (f" (this rank: {detail})" if detail else ""))
        sizes, widths = [m[1] for m in metas], [m[2] for m in metas]
        if len(set(sizes)) > 1:
            raise MLCDError(f"PartialFC input: the local batch size differs across ranks {sizes}; "
                            "every rank must pass the same batch size")
        if len(set(widths)) > 1:
            raise MLCDError(f"PartialFC input: the label width l differs across ranks {widths}")
        late = [(r, m[5:]) for r, m in enumerate(metas) if m[5] or m[10]]
        if late:
            unit = "step" if self._tags_are_steps else "call"
            first = min(rec[1] for _, rec in late)
            last = max(rec[2] for _, rec in late)
            parts = []
            for r, (n_range, _a, _b, lo, hi, n_missing) in late:
                if n_range:
                    parts.append(f"rank {r}: {n_range} call(s) with labels outside [0, num_classes={self.num_classes}) "
                                 f"(-1 = padding), min {lo} max {hi}")
                if n_missing:
                    parts.append(f"rank {r}: {n_missing} call(s) with -1 padding in labels[:, 0], which "
                                 f"loss={self.loss_type!r} needs a class in")
            raise MLCDError(f"PartialFC labels: bad labels in unchecked {unit}s {first}..{last} "
                            f"(found at {unit} {self._tag()}): " + "; ".join(parts))
        out = [(r, m[3], m[4]) for r, m in enumerate(metas) if m[3] < -1 or m[4] >= self.num_classes]
        if out:
            raise MLCDError("PartialFC labels: values outside [0, num_classes={}) (-1 = padding): {}".format(
                self.num_classes, "; ".join(f"rank {r} has min {lo} max {hi}" for r, lo, hi in out)))
        if self.loss_fn.single_positive and min(m[3] for m in metas) < 0:
            # only the first column matters (unicom): check it exactly (rare path, one more reduce)
            first_bad = (labels[:, 0] < 0).any().to(torch.long).reshape(1)
            if self.world_size > 1:
                dist.all_reduce(first_bad, group=self.group)
            if first_bad.item():
                raise MLCDError(f"PartialFC labels: loss={self.loss_type!r} needs a class in labels[:, 0] of every "
                                "sample (found -1 padding)")
        self._checked[kind] = sig
        return labels

    def _sample(self, labels: torch.Tensor):
        """(index of sampled local rows or None = all, positive columns [N, l] in sampled order or -1)."""
        lo, n = self.class_start, self.num_local
        inside = (labels >= lo) & (labels < lo + n)
        local = torch.where(inside, labels - lo, torch.full_like(labels, -1))
        if self._planned is not None:
            index = self._planned[0]
        elif self.num_sample >= n:
            index = None
        elif labels.numel() <= self.num_sample:
            # every positive fits in the sample whatever the labels are: a fixed-size draw, no
            # host sync (the same index and generator state as the branch below)
            hit = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
            hit[torch.where(inside, local, n).reshape(-1)] = True
            score = torch.rand(n, generator=self.generator, device=labels.device)
            score = torch.where(hit[:n], torch.full_like(score, 2.0), score)
            index = torch.topk(score, self.num_sample, sorted=False).indices.sort().values
        else:
            positives = torch.unique(local[inside])  # a size the data decides: a host sync
            if positives.numel() > self.num_sample:
                index = positives
            else:
                score = torch.rand(n, generator=self.generator, device=labels.device)
                score[positives] = 2.0
                index = torch.topk(score, self.num_sample, sorted=False).indices.sort().values
        if index is None:
            return None, local
        cols = torch.searchsorted(index, local.clamp(min=0))
        return index, torch.where(inside, cols, torch.full_like(cols, -1))

    def plan(self, local_labels: torch.Tensor) -> None:
        """Gradient accumulation: draw the sampled class set from ``local_labels`` (this rank's
        labels of every micro-batch of the coming step; collective) and keep it for the
        forwards until the optimiser's next step (``take_sampled``)."""
        dummy = torch.zeros(local_labels.shape[0], self.embedding_size, device=self.weight.device)
        labels = self._validate(dummy, local_labels, kind="plan")
        if self.world_size > 1:
            labels = _all_gather(labels, self.group, self.world_size)
        if self.loss_fn.single_positive:
            labels = labels[:, :1]
        self._planned = None
        self._planned = (self._sample(labels)[0],)

    def _phi(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.margin
        if self.margin_type == "cos":
            return cos - m
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-12))
        arc = cos * math.cos(m) - sin * math.sin(m)
        return torch.where(cos > math.cos(math.pi - m), arc, cos - m * math.sin(m))

    def _across_ranks_lse(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_ranks exp(x) elementwise, max-stabilised; gradient flows to this rank's x."""
        if self.world_size == 1:
            return x
        m = x.detach().clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        local = torch.exp(x - m)
        total = local.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        total = total + (local - local.detach())  # value: the global sum, bit-identical on every rank
        ok = total.detach() > 0
        out = m + torch.log(torch.where(ok, total, torch.ones_like(total)))
        return torch.where(ok, out, torch.full_like(out, -math.inf))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise MLCDError(f"PartialFC: world_size {self.world_size} needs an initialised process group")
        labels = self._validate(local_embeddings, local_labels)
        dtype = torch.float64 if torch.float64 in (local_embeddings.dtype, self.weight.dtype) else torch.float32
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            emb = local_embeddings.to(dtype)
            if self.world_size > 1:
                emb = _AllGatherGrad.apply(emb, self.group, self.world_size, self.rank)
                labels = _all_gather(labels, self.group, self.world_size)
            if self.loss_fn.single_positive:
                labels = labels[:, :1]
            elif labels.shape[1] > 1:  # a repeated label in a row counts once
                srt = labels.sort(dim=1).values
                dup = torch.zeros_like(srt, dtype=torch.bool)
                dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
                labels = torch.where(dup, torch.full_like(srt, -1), srt)
            index, pos_cols = self._sample(labels)
            self.last_index = index
            if self.training and torch.is_grad_enabled():
                self._pending.append(index)
            e_n = F.normalize(emb, dim=1, eps=_NORM_EPS)
            chunk = max(1, self.max_chunk_elems // max(e_n.shape[0], self.embedding_size))
            lse_neg, cos_pos = _SampledLogSumExp.apply(e_n, self.weight, index, pos_cols, self.scale, chunk,
                                                       self.max_chunk_elems)
            valid = pos_cols >= 0
            neg_inf = torch.full((), -math.inf, dtype=dtype, device=e_n.device)
            if self.loss_fn.single_positive:
                x_pos = torch.where(valid, self.scale * self._phi(cos_pos), neg_inf).squeeze(1)
            else:
                x_pos = _safe_logsumexp(torch.where(valid, -self.scale * self._phi(cos_pos), neg_inf), dim=1)
            both = self._across_ranks_lse(torch.stack([x_pos, lse_neg], dim=1))
            pos, neg = both[:, 0], both[:, 1]
            return self.loss_fn.per_sample(pos, neg).mean()  # mlcd_train/losses.py

    def take_sampled(self) -> torch.Tensor | None | bool:
        """Rows sampled by the forwards since the last call (None = all rows, False = none)."""
        pending, self._pending = self._pending, []
        self._planned = None  # a plan lasts until the optimiser's step (or zero_grad)
        if not pending:
            return False
        if any(p is None for p in pending):
            return None
        if all(p is pending[0] for p in pending):  # one forward, or the micro-batches of one plan:
            return pending[0]                         # already sorted and unique, no torch.unique (a host sync)
        return torch.unique(torch.cat(pending))


# --------------------------------------------------------------------------- the optimiser

class PartialFCOptimizer(torch.optim.Optimizer):
    """Row-sparse optimiser for ``pfc.weight``: each ``step()`` updates only the rows sampled by
    the forwards since the previous step (``pfc.take_sampled()``), so unsampled centres and
    their state stay bit for bit unchanged.

    kind="adamw": AdamW (decoupled weight decay) with a per-row step count for the bias
    correction (equal to torch.optim.AdamW when every row is sampled every step).
    kind="sgd": SGD as torch.optim.SGD (L2 weight decay added to the gradient, momentum, no
    dampening).  ``param_groups[0]["lr"]`` is the learning rate, so torch LR schedulers work.
    State per row: ``exp_avg``/``exp_avg_sq`` (adamw) or ``momentum_buffer`` (sgd), and ``step``.
    """

    KINDS = ("adamw", "sgd")

    def __init__(self, pfc: PartialFC, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 eps: float = 1e-8, kind: str = "adamw", momentum: float = 0.0, rows_per_chunk: int = 4096):
        if kind not in self.KINDS:
            raise MLCDError(f"PartialFC optimizer kind: {kind!r} is not one of {self.KINDS}")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum)
        super().__init__([pfc.weight], defaults)
        self.pfc, self.kind, self.rows_per_chunk = pfc, kind, int(rows_per_chunk)
        w = pfc.weight
        st = self.state[w]
        st["step"] = torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
        for name in self.row_state_names():
            st[name] = torch.zeros_like(w, memory_format=torch.contiguous_format)

    def zero_grad(self, set_to_none: bool = True):
        """Clear the gradient and forget the rows sampled since the last step (a step skipped
        by the trainer, e.g. for a non-finite loss, must not leak its rows into the next one)."""
        self.pfc.take_sampled()
        super().zero_grad(set_to_none=set_to_none)

    def row_state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") if self.kind == "adamw" else ("momentum_buffer",)

    def shard_state(self) -> dict:
        st = self.state[self.pfc.weight]
        return {"kind": self.kind,
                "rows": {name: st[name].detach().cpu() for name in ("step",) + self.row_state_names()}}

    def _update(self, group, p, g, st: dict):
        """Update rows in place; tensors are [R, d] (and step [R])."""
        lr, wd = group["lr"], group["weight_decay"]
        step = st["step"]
        step += 1
        if self.kind == "adamw":
            b1, b2 = group["betas"]
            m, v = st["exp_avg"], st["exp_avg_sq"]
            sf = step.to(torch.float64)
            bc1 = (1.0 - torch.pow(b1, sf)).to(p.dtype).unsqueeze(1)
            bc2_sqrt = (1.0 - torch.pow(b2, sf)).sqrt().to(p.dtype).unsqueeze(1)
            if wd:
                p.mul_(1.0 - lr * wd)
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(group["eps"])
            p.addcdiv_(m / bc1, denom, value=-lr)
        else:
            if wd:
                g = g.add(p, alpha=wd)
            if group["momentum"]:
                buf = st["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                g = buf
            p.add_(g, alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = self.pfc.take_sampled()
        group = self.param_groups[0]
        p = self.pfc.weight
        if index is False or p.grad is None:
            return loss
        st = self.state[p]
        names = ("step",) + self.row_state_names()
        # found_inf (a device tensor, set by the trainer as torch's fused AdamW takes it): when
        # non-zero every row keeps its weights and state, decided without a host read
        skip = getattr(self, "found_inf", None)
        if skip is not None and index is None:
            index = torch.arange(p.shape[0], device=p.device)
        n = p.shape[0] if index is None else index.numel()
        for r0 in range(0, n, self.rows_per_chunk):
            r1 = min(n, r0 + self.rows_per_chunk)
            if index is None:
                self._update(group, p[r0:r1], p.grad[r0:r1], {k: st[k][r0:r1] for k in names})
            else:
                rows = index[r0:r1]
                pr, sr = p[rows], {k: st[k][rows] for k in names}
                self._update(group, pr, p.grad[rows], sr)
                if skip is not None:
                    keep = skip.to(p.device) > 0
                    pr = torch.where(keep, p[rows], pr)
                    sr = {k: torch.where(keep, st[k][rows], v) for k, v in sr.items()}
                p.index_copy_(0, rows, pr)
                for k in names:
                    st[k].index_copy_(0, rows, sr[k])
        return loss


# --------------------------------------------------------------------------- checkpoints

def save_partial_fc(pfc: PartialFC, path: str | os.PathLike, optimizer: PartialFCOptimizer | None = None) -> None:
    """Write this rank's shard (weights, layout, optional optimiser rows) atomically to ``path``."""
    atomic_torch_save(pfc.checkpoint_state(optimizer), path)


def _shard_paths(sources) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        folder = os.fspath(sources)
        if not os.path.isdir(folder):
            raise MLCDError(f"{folder}: not a folder of PartialFC shards")
        found = glob.glob(os.path.join(glob.escape(folder), "pfc_rank*.pt"))
        paths = [p for p in found if re.fullmatch(r"pfc_rank\d+\.pt", os.path.basename(p))]
        if not paths:
            raise MLCDError(f"{folder}: no pfc_rank*.pt shards")
        return sorted(paths, key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[-1]))
    return [os.fspath(p) for p in sources]


def load_partial_fc(pfc: PartialFC, sources: str | os.PathLike | Sequence[str | os.PathLike],
                    optimizer: PartialFCOptimizer | None = None) -> None:
    """Load the shards saved by ``save_partial_fc`` with ANY number of ranks into ``pfc`` (this
    rank's class range) and, when given, ``optimizer``'s per-row state.  ``sources``: the folder
    holding ``pfc_rank*.pt`` or a list of shard files.  Everything is checked (same
    num_classes and embedding size, shards tiling [0, num_classes), optimiser kind) before
    anything is copied.  Needs no process group; each rank reads only the rows it owns
    (memory-mapped)."""
    paths = _shard_paths(sources)
    shards = []
    for path in paths:
        st = safe_torch_load(path, "PartialFC shard", mmap=True)  # regular file, weights_only
        if not isinstance(st, dict) or st.get("format") != FORMAT:
            fmt = st.get("format") if isinstance(st, dict) else None
            raise MLCDError(f"{path}: not a PartialFC shard (format {fmt!r}, expected {FORMAT!r})")
        for key, want in (("num_classes", pfc.num_classes), ("embedding_size", pfc.embedding_size)):
            if st.get(key) != want:
                raise MLCDError(f"{path}: {key} is {st.get(key)}, this run has {want}")
        w_saved = st.get("world_size")
        start, count = class_range(st["num_classes"], w_saved, st["rank"]) if isinstance(w_saved, int) and \
            isinstance(st.get("rank"), int) and 0 <= st["rank"] < w_saved else (None, None)
        if (st.get("class_start"), st.get("num_local")) != (start, count):
            raise MLCDError(f"{path}: class range {st.get('class_start')}+{st.get('num_local')} does not match "
                            f"rank {st.get('rank')} of {w_saved}")
        if not torch.is_tensor(st.get("weight")) or tuple(st["weight"].shape) != (count, pfc.embedding_size):
            raise MLCDError(f"{path}: weight missing or not [{count}, {pfc.embedding_size}]")
        if optimizer is not None:
            o = st.get("optimizer")
            if not isinstance(o, dict):
                raise MLCDError(f"{path}: no optimizer state in this shard")
            if o.get("kind") != optimizer.kind:
                raise MLCDError(f"{path}: optimizer kind {o.get('kind')!r}, this run uses {optimizer.kind!r}")
            for name in ("step",) + optimizer.row_state_names():
                t = o.get("rows", {}).get(name)
                if not torch.is_tensor(t) or t.shape[0] != count:
                    raise MLCDError(f"{path}: optimizer.rows.{name} missing or not {count} rows")
        shards.append((path, st))
    worlds = {st["world_size"] for _, st in shards}
    ranks = sorted(st["rank"] for _, st in shards)
    if len(worlds) != 1 or ranks != list(range(next(iter(worlds)))):
        raise MLCDError(f"{', '.join(paths)}: shards do not form one complete set "
                        f"(world sizes {sorted(worlds)}, ranks {ranks})")
    lo, hi = pfc.class_start, pfc.class_start + pfc.num_local
    opt_state = optimizer.state[pfc.weight] if optimizer is not None else None
    with torch.no_grad():
        for _path, st in shards:
            a, b = st["class_start"], st["class_start"] + st["num_local"]
            s, e = max(lo, a), min(hi, b)
            if s >= e:
                continue
            pfc.weight[s - lo:e - lo].copy_(st["weight"][s - a:e - a])
            if opt_state is not None:
                for name, t in st["optimizer"]["rows"].items():
                    if name in opt_state:
                        opt_state[name][s - lo:e - lo].copy_(t[s - a:e - a])
