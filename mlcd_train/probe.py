"""``mlcd probe``: linear probe and k-NN classification on frozen features.

Two standard ways to judge a representation without fine-tuning it:

* **Linear probe**, following CLIP's protocol (Radford et al. 2021, appendix A.3): a
  multinomial logistic regression fitted with L-BFGS on standardised features; the L2
  strength is chosen on a held-out part of the training split (a log-spaced sweep), then the
  classifier is refitted on the whole training split with that strength and scored on the
  test split.  Implemented in torch (``torch.optim.LBFGS``, full batch), no new dependency.
* **k-NN**, as in InstDisc / DINO: cosine similarity to every training feature, the k = 20
  nearest vote for their class with weight ``exp(sim / T)``, T = 0.07.

The command embeds a train and a test shard folder (shards with ground-truth ``cls``)
with any embedder of the clustering registry (``pca``, ``open_clip:NAME``, ``hf:PATH``,
``mlcd:PATH``), caches the features under ``OUT/features/<embedder-slug>/<split>.npy``
(reused while the split's shard files -- paths, sizes, mtimes -- are those recorded in
``embedder.json``), prints top-1 accuracies and writes ``OUT/probe.json``.  When both shard
folders hold a ``classes.json``, test class ids are mapped to the training split's by name.

Python: :func:`probe` (what the command runs) -> :class:`ProbeResult`; the core functions
(:func:`linear_probe`, :func:`knn_classify`) work on in-memory arrays.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mlcd_core.args import fraction_open, nonneg_int, positive_float, positive_int
from mlcd_core.errors import MLCDError

DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-6, 1, 8))
DEFAULT_L2_TEXT = ",".join(f"{v:g}" for v in DEFAULT_L2_GRID)  # --l2-grid's default, as the command sweeps it


# --------------------------------------------------------------------------- linear probe
def _standardise(train: torch.Tensor, *others: torch.Tensor):
    """float32 copies of ``train`` and ``others`` standardised by the training split's mean and
    standard deviation (both summed in float64, without a float64 copy of the features)."""
    n = max(train.shape[0], 1)
    mean = train.sum(0, dtype=torch.float64) / n
    centred = train.float() - mean.float()   # a new tensor: scaled in place below
    std = (torch.linalg.vector_norm(centred, dim=0, dtype=torch.float64) / max(n - 1, 1) ** 0.5).clamp_min(1e-6)
    inv = (1.0 / std).float()
    return [centred.mul_(inv)] + [((t.float() - mean.float()) * inv) for t in others]


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 500, tol: float = 1e-5, init=None):
    """Multinomial logistic regression, full-batch L-BFGS.

    Minimises ``mean cross-entropy + l2 * ||W||^2`` (the bias is not penalised; the problem
    is strictly convex for l2 > 0, so the start point ``init = (W, b)`` only changes the
    number of iterations).  Returns ``(W [d, C], b [C])`` in float64.

    The parameters, the loss and L-BFGS's history are float64; the two products over the
    samples are float32 in the layout a CPU BLAS runs fast for a few classes ([C, d] @ [d, N]
    and [C, N] @ [N, d]; ``x @ W`` and ``x.T @ G`` with autograd were 6x slower), with the
    gradient written by hand (softmax minus one-hot).
    """
    y = y.long()
    n, d = x.shape
    xs = x.float().contiguous()          # [N, d]: the gradient's product (x itself when float32)
    xt = xs.t().contiguous()             # [d, N]: the logits' product (a transposed view is 1.5x slower)
    if init is None:
        w = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    else:
        w = init[0].detach().clone().double().requires_grad_(True)
        b = init[1].detach().clone().double().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    rows = y.unsqueeze(0)
    minus_one = torch.full((1, n), -1.0)

    def closure():
        with torch.no_grad():
            z = torch.addmm(b.float().unsqueeze(1), w.t().float(), xt)        # logits [C, N]
            lse = torch.logsumexp(z, dim=0)
            ce = (lse.double().sum() - z.gather(0, rows).double().sum()) / max(n, 1)
            loss = ce + l2 * (w * w).sum()
            g = torch.exp_(z.sub_(lse)).scatter_add_(0, rows, minus_one)      # softmax - one-hot
            w.grad = (g @ xs).double().t().contiguous().div_(max(n, 1)).add_(w, alpha=2.0 * l2)
            b.grad = g.sum(1, dtype=torch.float64).div_(max(n, 1))
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(w, b, x, y) -> float:
    if len(y) == 0:
        return float("nan")
    pred = torch.addmm(b.float(), x.float(), w.float()).argmax(1)
    return float((pred == y.long()).double().mean())


def linear_probe(train_x, train_y, test_x, test_y, l2_grid=DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 seed: int = 0, max_iter: int = 500, num_classes: int | None = None) -> dict:
    """CLIP-style linear probe; returns top-1 on the test split and the sweep.

    ``l2_grid``: L2 strengths tried on the held-out ``val_fraction`` of the training split
    (the best validation accuracy wins; ties go to the stronger regularisation).  With a
    single value, no validation split is made.
    """
    tx = torch.as_tensor(np.asarray(train_x), dtype=torch.float32)
    ty = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    vx = torch.as_tensor(np.asarray(test_x), dtype=torch.float32)
    vy = torch.as_tensor(np.asarray(test_y), dtype=torch.long)
    if tx.ndim != 2 or vx.ndim != 2 or tx.shape[1] != vx.shape[1]:
        raise MLCDError(f"linear probe: features must be [n, d] with the same d, got {tuple(tx.shape)} "
                        f"and {tuple(vx.shape)}")
    if len(tx) != len(ty) or len(vx) != len(vy):
        raise MLCDError("linear probe: features and labels have different lengths")
    if num_classes is None:
        num_classes = int(max(ty.max(), vy.max() if len(vy) else 0)) + 1
    grid = [float(v) for v in l2_grid]
    sweep = []
    if len(grid) > 1:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(tx), generator=g)
        n_val = max(1, int(round(len(tx) * val_fraction)))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        fx, sx = _standardise(tx[fit_idx], tx[val_idx])
        best, wb = None, None
        # strongest regularisation first, each fit warm-started from the previous solution
        for l2 in sorted(grid, reverse=True):
            wb = fit_logistic_regression(fx, ty[fit_idx], num_classes, l2, max_iter=max_iter, init=wb)
            acc = _accuracy(*wb, sx, ty[val_idx])
            sweep.append({"l2": l2, "val_top1": acc})
            if best is None or acc > best[1]:  # strict: ties go to the larger l2
                best = (l2, acc, wb)
        sweep.sort(key=lambda r: r["l2"])
        best_l2, init = best[0], best[2]
    else:
        best_l2, init = grid[0], None
    fx, sx = _standardise(tx, vx)
    w, b = fit_logistic_regression(fx, ty, num_classes, best_l2, max_iter=max_iter, init=init)
    return {"top1": _accuracy(w, b, sx, vy), "train_top1": _accuracy(w, b, fx, ty), "l2": best_l2,
            "sweep": sweep, "num_classes": num_classes, "n_train": len(tx), "n_test": len(vx)}


# --------------------------------------------------------------------------- k-NN
def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """Cosine k-NN with ``exp(sim / T)`` weighted votes; returns the predicted class of each test row."""
    tx = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    ty = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    qx = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_x), dtype=torch.float32), dim=1)
    if num_classes is None:
        num_classes = int(ty.max()) + 1
    k = min(k, len(tx))
    preds = []
    for start in range(0, len(qx), batch_size):
        sim = qx[start:start + batch_size] @ tx.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, ty[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def knn_classify(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict:
    test_y = np.asarray(test_y)
    if num_classes is None:
        num_classes = int(max(np.max(train_y), np.max(test_y) if len(test_y) else 0)) + 1
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    top1 = float((pred == test_y).mean()) if len(test_y) else float("nan")
    return {"top1": top1, "k": k, "temperature": temperature}


# --------------------------------------------------------------------------- features
def embedder_slug(spec: str) -> str:
    """A file-name-safe, collision-free folder name for an embedder spec."""
    import hashlib

    kind, _, arg = spec.partition(":")
    tail = ""
    if arg:
        parts = [p for p in re.split(r"[\\/]+", arg) if p]
        tail = "-" + "-".join(parts[-2:])
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", kind + tail).strip("._-")[:60] or "embedder"
    return f"{readable}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def _canonical_spec(spec: str) -> str:
    """Absolute paths in path-carrying specs, so the cache does not depend on the working folder."""
    from clustering.embedders import spec_path

    path = spec_path(spec)
    return f"{spec.partition(':')[0]}:{os.path.abspath(path)}" if path else spec


def _embedder_options(args) -> dict:
    """The embedder options the probe was given (its ``probe_flag`` s), by the registry's names;
    an empty text is no value."""
    from clustering.embedders import embedder_options

    found = {}
    for o in embedder_options():
        value = getattr(args, o.probe_name, None) if o.probe_name else None
        if value is not None and value != "":
            found[o.name] = value
    return found


def _embed_split(spec: str, shards: str, emb_dir: str, args) -> None:
    from clustering import embed

    embed.embed(shards, emb_dir, spec, batch_size=args.batch_size, workers=args.workers,
                device=args.device or None, overwrite=bool(args.overwrite_features), **_embedder_options(args))


def _load_emb(emb_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of an EMB folder (float32) and their ground-truth classes; rows without class dropped."""
    from clustering import store

    folder = store.open_emb(emb_dir)
    xs, ys = [], []
    for sh in folder.shards:
        cls = store.load_cls(sh)
        if cls is None:
            raise MLCDError(f"shard {sh.name}: carries no ground-truth class (no KEY.cls members); "
                            f"the probe needs labelled shards")
        x = store.read_rows(sh, 0, sh.n)
        keep = cls >= 0
        xs.append(x[keep])
        ys.append(cls[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) == 0:
        raise MLCDError(f"{emb_dir}: no sample with a ground-truth class")
    return x, y


def _shards_key(shards: str) -> dict:
    """What the cached features of a split depend on: its shard files (resolved paths, sizes, mtimes)."""
    from mlcd_core.reader import list_shards

    files = []
    for path in list_shards(shards):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise MLCDError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
        files.append([path, st.st_size, st.st_mtime_ns])
    return {"shards": os.path.abspath(shards), "files": files}


def features_for(spec: str, train_shards: str, test_shards: str, out: str, args) -> tuple[str, dict]:
    """Embed both splits (cached) -> (feature folder, {split: (x, y)}).

    ``embedder.json`` records, per split, the key of the shards its features (and its
    ``emb_<split>`` folder) come from; it is written before embedding, once the folder of
    another key is cleared, so features are reused only for the very shards they were made of."""
    import shutil

    from clustering.embedders import fitted_spec
    from mlcd_core.io import atomic_save_json, atomic_save_npy, json_field, load_json

    spec = _canonical_spec(spec)
    fdir = os.path.join(out, "features", embedder_slug(spec))
    os.makedirs(fdir, exist_ok=True)
    info_path = os.path.join(fdir, "embedder.json")
    info = {"spec": spec}
    if os.path.exists(info_path):
        old = load_json(info_path, expect=dict)
        json_field(old, "spec", str, info_path, default=None, nullable=True)
        if old.get("spec") != spec and not args.overwrite_features:
            raise MLCDError(f"{info_path}: cached features of {old.get('spec')!r}, not {spec!r}")
        if old.get("spec") == spec:
            info.update(old)
    keys = {"train": _shards_key(train_shards), "test": _shards_key(test_shards)}
    # an embedder fitted on the corpus embeds the test split with the state fitted on the
    # training split (its kind's state_file in emb_train): the test features depend on both
    reuse = fitted_spec(spec, os.path.join(fdir, "emb_train"))
    if reuse is not None:
        keys["test"]["fitted_on"] = keys["train"]
    data = {}
    for split, shards in (("train", train_shards), ("test", test_shards)):
        xp, yp = os.path.join(fdir, f"{split}.npy"), os.path.join(fdir, f"{split}.cls.npy")
        emb_dir = os.path.join(fdir, f"emb_{split}")
        if info.get(split) != keys[split]:  # features of other shards (or none): clear, then record
            for f in (xp, yp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
            shutil.rmtree(emb_dir, ignore_errors=True)
            info[split] = keys[split]
            atomic_save_json(info_path, info)
        elif os.path.exists(xp) and os.path.exists(yp) and not args.overwrite_features:
            print(f"mlcd probe: {split} features cached in {xp}", file=sys.stderr)
            data[split] = _load_cached(xp, yp)
            continue
        _embed_split(reuse if reuse is not None and split == "test" else spec, shards, emb_dir, args)
        x, y = _load_emb(emb_dir)
        atomic_save_npy(xp, x.astype(np.float32))
        atomic_save_npy(yp, y.astype(np.int64))
        data[split] = (x, y)
    return fdir, data


def _load_cached(xp: str, yp: str) -> tuple[np.ndarray, np.ndarray]:
    """Cached features [n, d] float and classes [n] (non-negative ints), never unpickled."""
    from mlcd_core.io import safe_np_load

    x, y = safe_np_load(xp, "features"), safe_np_load(yp, "classes")
    if x.ndim != 2 or x.dtype.kind != "f":
        raise MLCDError(f"{xp}: cached features should be a float [n, d] array, found {x.dtype} {x.shape}")
    if y.shape != (len(x),) or y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise MLCDError(f"{yp}: cached classes should be {len(x)} non-negative integers, found {y.dtype} {y.shape}")
    return x, y


def check_probe_folders(args) -> None:
    """The probe writes OUT/probe-*.json (or --json) and clears and refills OUT/features/...:
    neither may be a folder it reads (the shard folders, the embedder's weights)."""
    from mlcd_core.reader import list_shards
    from mlcd_core.io import check_out_separate

    inputs = []
    for option, src in (("--train", args.train), ("--test", args.test)):
        inputs += [(option, d) for d in sorted({os.path.dirname(s) for s in list_shards(src)})]
    from clustering.embedders import embedder_options, spec_reads

    flags = {o.name: o.probe_flag for o in embedder_options()}
    inputs += [(flags[name] if name else "--embedder", path)  # the spec's own path, its option files
               for name, path in spec_reads(args.embedder, _embedder_options(args))]
    check_out_separate("--out", args.out, inputs)
    check_out_separate("--out", os.path.join(args.out, "features"), inputs, replaces_out=True)
    if args.json:
        check_out_separate("--json", args.json, inputs, out_is_file=True)


def _classes_file(shards: str) -> str | None:
    """The ``classes.json`` of a shard folder (or of the folder of a shard file); None when absent."""
    folder = shards if os.path.isdir(shards) else os.path.dirname(os.path.abspath(shards))
    path = os.path.join(folder, "classes.json")
    return path if os.path.isfile(path) else None


def align_test_classes(train_shards: str, test_shards: str, y_test: np.ndarray) -> np.ndarray:
    """Test class ids renumbered as the training split's, by name, when both folders have a
    ``classes.json`` (each ``mlcd shards`` input numbers its own classes); else unchanged."""
    train_file, test_file = _classes_file(train_shards), _classes_file(test_shards)
    if train_file is None or test_file is None:
        return y_test
    from mlcd_train.data.shards import load_classes

    train_ids = {name: i for i, name in load_classes(train_file)[1].items()}
    test_names = load_classes(test_file)[1]
    mapping = {}
    for c in np.unique(y_test).tolist():
        if c not in test_names:
            raise MLCDError(f"{test_file}: has no name for class id {c} of the test shards")
        if test_names[c] not in train_ids:
            raise MLCDError(f"{test_file}: class {test_names[c]!r} is not in {train_file}; the probe "
                            "cannot score a class it was not trained on")
        mapping[c] = train_ids[test_names[c]]
    return np.array([mapping[c] for c in y_test.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from clustering.embedders import embedder_options, model_help

    p.add_argument("--embedder", "--model", dest="embedder", required=True,
                   help=f"{model_help()} (the clustering embedder registry)")
    p.add_argument("--train", required=True, help="training shards with ground-truth cls (folder, tar, pattern)")
    p.add_argument("--test", required=True, help="test shards with ground-truth cls")
    p.add_argument("--out", required=True, help="output folder: features/<embedder>/, probe-<embedder>.json")
    p.add_argument("--json", default=None, help="result file (default OUT/probe-<embedder-slug>.json)")
    kinds = p.add_argument_group("embedder options (each kind's own, from its registration)")
    for o in embedder_options():
        if o.probe_flag:
            kinds.add_argument(o.probe_flag, dest=o.probe_name, type=o.type, default=o.default, help=o.help)
    p.add_argument("--knn-k", type=positive_int, default=20, help="neighbours that vote (default 20)")
    p.add_argument("--temperature", type=positive_float, default=0.07,
                   help="k-NN vote weight exp(sim/T) (default 0.07)")
    p.add_argument("--l2-grid", default=DEFAULT_L2_TEXT,
                   help="comma-separated L2 strengths swept on the held-out part (default 1e-6..10, log-spaced)")
    p.add_argument("--val-fraction", type=fraction_open, default=0.2,
                   help="fraction of the training split held out to choose the L2 strength (default 0.2)")
    p.add_argument("--max-iter", type=positive_int, default=500, help="L-BFGS iterations per fit (default 500)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--no-knn", action="store_true", help="skip k-NN")
    p.add_argument("--batch-size", type=positive_int, default=256, help="embedding batch size (default 256)")
    p.add_argument("--workers", type=nonneg_int, default=2, help="DataLoader workers while embedding (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite-features", action="store_true",
                   help="re-embed even when cached features exist (e.g. the checkpoint changed)")
    return p


def check_probe_args(args) -> list[float]:
    """The L2 grid of ``args`` and the folder checks, before anything is written (or locked)."""
    try:
        grid = [float(v) for v in args.l2_grid.split(",") if v.strip()]
    except ValueError:
        raise MLCDError(f"--l2-grid {args.l2_grid!r}: expected comma-separated numbers") from None
    if not grid or any(not math.isfinite(v) or v < 0 for v in grid):
        raise MLCDError(f"--l2-grid {args.l2_grid!r}: needs one or more finite non-negative numbers")
    check_probe_folders(args)
    return grid


def run_probe(args, grid: Optional[list] = None) -> dict:
    if grid is None:
        grid = check_probe_args(args)
    t0 = time.perf_counter()
    fdir, data = features_for(args.embedder, args.train, args.test, args.out, args)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    yte = align_test_classes(args.train, args.test, yte)
    if xtr.shape[1] != xte.shape[1]:
        raise MLCDError(f"{fdir}: train features have dim {xtr.shape[1]}, test {xte.shape[1]}")
    t_feat = time.perf_counter() - t0
    num_classes = int(max(ytr.max(), yte.max())) + 1
    result = {"embedder": _canonical_spec(args.embedder), "features": fdir, "dim": int(xtr.shape[1]),
              "n_train": int(len(ytr)), "n_test": int(len(yte)), "num_classes": num_classes,
              "seconds_features": round(t_feat, 2)}
    if not args.no_linear:
        t = time.perf_counter()
        result["linear"] = linear_probe(xtr, ytr, xte, yte, l2_grid=sorted(grid), val_fraction=args.val_fraction,
                                        seed=args.seed, max_iter=args.max_iter, num_classes=num_classes)
        result["linear"]["seconds"] = round(time.perf_counter() - t, 2)
    if not args.no_knn:
        t = time.perf_counter()
        result["knn"] = knn_classify(xtr, ytr, xte, yte, k=args.knn_k, temperature=args.temperature,
                                     num_classes=num_classes)
        result["knn"]["seconds"] = round(time.perf_counter() - t, 2)
    return result


@dataclass
class ProbeResult:
    """What :func:`probe` returns: ``record`` is the dict written to ``path`` (probe.json:
    embedder, features folder, dim, n_train, n_test, num_classes, ``linear`` and ``knn`` with
    their ``top1``)."""

    record: dict
    path: str

    @property
    def linear_top1(self) -> Optional[float]:
        return self.record["linear"]["top1"] if "linear" in self.record else None

    @property
    def knn_top1(self) -> Optional[float]:
        return self.record["knn"]["top1"] if "knn" in self.record else None


def probe(embedder: str, train: str, test: str, out: str, *, json: Optional[str] = None, knn_k: int = 20,
          temperature: float = 0.07, l2_grid: Union[str, Sequence[float]] = DEFAULT_L2_TEXT,
          val_fraction: float = 0.2, max_iter: int = 500, seed: int = 0, linear: bool = True, knn: bool = True,
          batch_size: int = 256, workers: int = 2, device: Optional[str] = None,
          overwrite_features: bool = False, **options) -> ProbeResult:
    """``mlcd probe``: linear probe and k-NN of the frozen features of ``embedder`` (any spec of
    the clustering registry) on the labelled shards ``train`` and ``test``.

    Features are cached under ``out/features/<embedder-slug>/``; the result is written to
    ``json`` (default ``out/probe-<embedder-slug>.json``) and returned as a
    :class:`ProbeResult`.  Keywords are the command's flags (``linear=False`` is
    ``--no-linear``, ``knn=False`` is ``--no-knn``; ``l2_grid`` a sequence or the flag's
    comma-separated text), and as ``**options`` the embedder options the registry offers the
    probe (their ``probe_flag`` s: ``pretrained`` for open_clip, ``pca_dim`` and
    ``pca_image_size`` for pca); an omitted one takes its default.  Bad input is an
    :class:`~mlcd_core.errors.MLCDError`.
    """
    from clustering.embedders import embedder_options
    from mlcd_core.io import atomic_save_json

    offered = {o.probe_name: o.default for o in embedder_options() if o.probe_name}
    unknown = sorted(set(options) - set(offered))
    if unknown:
        raise TypeError(f"probe() got an unexpected keyword argument {unknown[0]!r} "
                        f"(embedder options: {', '.join(sorted(offered))})")
    options = {**offered, **options}

    grid = l2_grid if isinstance(l2_grid, str) else ",".join(f"{float(v):.17g}" for v in l2_grid)
    args = argparse.Namespace(embedder=embedder, train=train, test=test, out=out, json=json, knn_k=knn_k,
                              temperature=temperature, l2_grid=grid, val_fraction=val_fraction, max_iter=max_iter,
                              seed=seed, no_linear=not linear, no_knn=not knn, batch_size=batch_size, workers=workers,
                              device=device, overwrite_features=overwrite_features, **options)
    from mlcd_core.lock import output_lock

    torch.manual_seed(seed)
    grid = check_probe_args(args)  # a refused --out (an input folder) is never locked or created
    with output_lock(out, "probe"):  # one probe at a time into this output (issue 15)
        result = run_probe(args, grid)
        path = json or os.path.join(out, f"probe-{os.path.basename(result['features'])}.json")
        atomic_save_json(path, result)
    return ProbeResult(result, path)


def main(argv: list[str] | None = None) -> int:
    """``mlcd probe``'s command line: the flags of :func:`build_parser` -> :func:`probe`."""
    from clustering.embedders import embedder_options

    a = build_parser().parse_args(argv)
    res = probe(a.embedder, a.train, a.test, a.out, json=a.json, knn_k=a.knn_k, temperature=a.temperature,
                l2_grid=a.l2_grid, val_fraction=a.val_fraction, max_iter=a.max_iter, seed=a.seed,
                linear=not a.no_linear, knn=not a.no_knn, batch_size=a.batch_size, workers=a.workers,
                device=a.device, overwrite_features=a.overwrite_features,
                **{o.probe_name: getattr(a, o.probe_name) for o in embedder_options() if o.probe_name})
    result, path = res.record, res.path
    parts = []
    if "linear" in result:
        parts.append(f"linear top-1 {100 * result['linear']['top1']:.2f}% (l2 {result['linear']['l2']:g})")
    if "knn" in result:
        parts.append(f"{result['knn']['k']}-NN top-1 {100 * result['knn']['top1']:.2f}%")
    print(f"mlcd probe: {result['embedder']} on {result['n_train']} train / {result['n_test']} test images: "
          + ", ".join(parts) + f" -> {path}")
    return 0


if __name__ == "__main__":
    from mlcd_core.stage import run_main
    from mlcd_train import probe as _stage  # the module under its own name, as `mlcd probe` runs it

    sys.exit(run_main("probe", _stage.main, sys.argv[1:]))
