"""``mlcd embed``: embed every image of a shard folder with a teacher model.

    mlcd embed --shards DIR --out EMB --model open_clip:ViT-L-14 --pretrained /models/vitl14.bin
    mlcd embed --shards DIR --out EMB --model hf:/models/clip-vit-large-patch14
    mlcd embed --shards DIR --out EMB --model mlcd:runs/exp1          # our own checkpoint/export
    mlcd embed --shards DIR --out EMB --model pca --dim 64            # weights-free baseline
    torchrun --nproc-per-node 8 -m clustering.embed ...               # shards split over ranks

Output per shard, in shard order: ``EMB/<shard>.npy`` float16 [n, d] L2-normalised (rows in
the shard's sample order, corrupt samples left out), ``EMB/<shard>.keys.npy`` (``__key__``
of each row), ``EMB/<shard>.cls.npy`` int32 (ground-truth class, -1 unknown; only when the
shard carries classes); ``EMB/meta.json`` (embedder spec and details, dim, per-shard counts;
``complete`` turns true when every shard is done); for ``pca`` the fitted projection
``EMB/pca.npz`` (fitted on the first ``--pca-fit-samples`` images, re-used on resume and
loadable with ``--model pca:EMB/pca.npz`` for another split).

Every file is written atomically; a rerun skips finished shards, ``--overwrite`` redoes them.
Shards are read by ``--workers`` DataLoader workers, in groups of one shard per worker
(a crash loses at most one group).  Inference runs under ``torch.inference_mode`` and, on
CUDA, bf16 autocast (``--no-autocast`` for fp32).  An EMB folder made by another embedder is
refused unless ``--overwrite``.

Python: :func:`embed` (what the command runs) -> :class:`EmbedResult`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from clustering import store
from clustering.embedders import embedder_kind, embedder_options, get_embedder, kind_options, model_help
from mlcd_core.errors import MLCDError
from mlcd_core.args import nonneg_int, positive_int
from mlcd_core.io import check_out_separate, load_json, remove_stale_tmp
from mlcd_core.lock import output_lock


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard folder, tar, brace pattern (see mlcd shards)")
    p.add_argument("--out", required=True, help="embeddings folder EMB")
    p.add_argument("--model", required=True, help=f"{model_help()} (the embedder registry)")
    kinds = p.add_argument_group("embedder options (each kind's own, from its registration)")
    for o in embedder_options():
        kinds.add_argument(o.flag, dest=o.name, type=o.type, default=o.default, help=o.help)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=nonneg_int, default=4, help="DataLoader workers (default 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-autocast", action="store_true", help="fp32 on GPU instead of bf16 autocast")
    p.add_argument("--overwrite", action="store_true", help="redo finished shards (and a fitted embedder's fit)")
    return p


def _loader(shards, transform, batch_size, workers, pin_memory=False):
    from torch.utils.data import DataLoader

    from mlcd_core.reader import ShardDataset, collate_samples

    ds = ShardDataset(shards, transform=transform, rank=0, world_size=1)
    nw = min(workers, len(shards))
    return DataLoader(ds, batch_size=batch_size, num_workers=nw, collate_fn=collate_samples,
                      pin_memory=pin_memory, persistent_workers=False)


def fit_embedder(embedder, shards, batch_size: int):
    """Fit an embedder that ``needs_fit`` on the first ``embedder.fit_samples`` images of
    ``shards`` (in shard order, through its own transform)."""
    from mlcd_core.reader import ShardDataset, collate_samples
    from torch.utils.data import DataLoader

    n = int(embedder.fit_samples)
    ds = ShardDataset(shards, transform=embedder.transform, rank=0, world_size=1)
    batches, seen = [], 0
    for b in DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=collate_samples):
        batches.append(b["image"][: n - seen])
        seen += len(batches[-1])
        if seen >= n:
            break
    return embedder.fit(batches)


def embed_group(embedder, group: list[str], out: str, batch_size: int, workers: int, bar=None) -> dict:
    """Embed whole shards (one per worker), write each, return {shard name: rows}."""
    import torch

    from mlcd_core.reader import shard_name

    buf = {shard_name(s): ([], [], [], [], []) for s in group}  # index, key, cls, emb chunks
    for b in _loader(group, embedder.transform, batch_size, workers, pin_memory=embedder.device.type == "cuda"):
        e = embedder(b["image"])
        if not torch.isfinite(e).all():
            row = int((~torch.isfinite(e).all(1)).nonzero()[0])
            raise MLCDError(f"{b['shard'][row]}: sample {b['key'][row]} (index {int(b['index'][row])}) "
                            f"embeds to NaN/inf with {embedder.spec}")
        e = e.cpu().numpy()
        for j, name in enumerate(b["shard"]):
            idx, keys, cls, rows, _ = buf[name]
            idx.append(int(b["index"][j]))
            keys.append(b["key"][j])
            cls.append(int(b["cls"][j]))
            rows.append(e[j])
        if bar is not None:
            bar.update(len(e))
    counts = {}
    for name, (idx, keys, cls, rows, _) in buf.items():
        order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
        x = np.stack(rows)[order] if rows else np.zeros((0, embedder.dim), np.float32)
        k = np.asarray(keys, dtype=np.str_)[order] if keys else np.zeros(0, dtype="<U1")
        c = np.asarray(cls, dtype=np.int32)[order]
        zero = np.linalg.norm(x, axis=1) < 1e-12 if len(x) else np.zeros(0, bool)
        if zero.any():
            raise MLCDError(f"{name}: sample {k[zero][0]} embeds to a zero vector with {embedder.spec}")
        store.write_shard(out, name, x, k, c if (c >= 0).any() else None)
        counts[name] = len(x)
    return counts


def portable_identity(ident: dict, out: str, key: Optional[str]) -> dict:
    """``embedder_info`` as EMB/meta.json records it: the fitted state file named by ``key``
    (the embedder's ``state_key``), when inside the EMB folder, by its path relative to the
    folder, so a moved or copied folder is still recognised as the same run."""
    ident = dict(ident)
    path = ident.get(key) if key else None
    if isinstance(path, str) and os.path.isabs(path):
        rel = os.path.relpath(path, os.path.abspath(out))
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            ident[key] = rel
    return ident


def comparable_identity(was: dict, now: dict, key: Optional[str]) -> dict:
    """The recorded ``was`` ready to compare with ``now``: a meta written before state files were
    recorded relative to the folder (an absolute path), or one of a folder since moved, names the
    same state file (``key``) when the content fingerprints (``weights_sha``) agree."""
    was = dict(was)
    if (key and key in was and was.get("weights_sha") and was.get("weights_sha") == now.get("weights_sha")
            and was[key] != now.get(key)):
        was[key] = now.get(key)
    return was


def model_paths(model: str, options: Optional[dict] = None) -> list[str]:
    """The files or folders an embedder spec reads with these options (a path ARG such as
    ``hf:PATH``, and what its kind's ``reads`` names: a config file, a weights file)."""
    from clustering.embedders import spec_reads

    return [path for _, path in spec_reads(model, options)]


@dataclass
class EmbedResult:
    """What :func:`embed` returns: ``out`` the EMB folder, the embedder's canonical ``spec`` and
    ``dim``, ``shards`` in the folder, ``shards_done`` / ``images_done`` by this run on this
    rank, ``seconds``; on rank 0 ``counts`` ({shard: rows}, as meta.json records them)."""

    out: str
    spec: str
    dim: int
    shards: int
    shards_done: int
    images_done: int
    seconds: float
    counts: Optional[dict] = None


def embed(shards, out: str, model: str, *, batch_size: int = 256, workers: int = 4, device: Optional[str] = None,
          autocast: bool = True, overwrite: bool = False, **options) -> EmbedResult:
    """``mlcd embed``: every image of ``shards`` (a folder, tar, brace pattern or list of tars)
    through the embedder ``model`` (``open_clip:NAME``, ``hf:PATH``, ``mlcd:PATH``, ``pca``,
    ``pca:FILE.npz``; see :func:`clustering.embedders.get_embedder`) into the EMB folder ``out``.

    Keywords are the command's flags: ``batch_size``, ``workers`` (DataLoader), ``device``,
    ``autocast`` (bf16 on CUDA), ``overwrite`` (redo finished shards, and refit), and as
    ``**options`` the embedder options of the registry
    (:func:`clustering.embedders.embedder_options`): ``pretrained`` (open_clip tag or file),
    ``dim``, ``image_size``, ``pca_fit_samples`` (pca); an option of another kind than
    ``model``'s is ignored, an omitted one takes its default.  Runs on every rank under
    torchrun (shards split over ranks); a rerun skips finished shards.  Bad input is an
    :class:`~mlcd_core.errors.MLCDError` naming the file or option.
    """
    from mlcd_core.reader import list_shards, shard_name
    from mlcd_core.dist import barrier, init_distributed
    from mlcd_core.progress import progress

    known = {o.name for o in embedder_options()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"embed() got an unexpected keyword argument {unknown[0]!r} "
                        f"(embedder options: {', '.join(sorted(known))})")
    info = init_distributed(device=device)
    shard_paths = list_shards(shards)
    if not shard_paths:
        raise MLCDError(f"{shards}: no shards found")
    names = [shard_name(s) for s in shard_paths]
    if len(set(names)) != len(names):  # outputs are keyed by name: two would share one file
        seen: dict = {}
        for s, n in zip(shard_paths, names):
            if n in seen:
                raise MLCDError(f"{s}: shard name {n} also names {seen[n]}; EMB files are keyed by shard "
                                f"name, so embed the two folders into separate --out folders")
            seen[n] = s
    # EMB's files and temporaries are replaced or deleted: never in a shard or model folder
    check_out_separate("--out", out, [("--shards", s) for s in sorted({os.path.dirname(s) for s in shard_paths})]
                       + [("--model", p) for p in model_paths(model, options)])
    with output_lock(out, "embed"):  # one run at a time into this output (issue 15)
        meta_path = os.path.join(out, store.META)
        old = load_json(meta_path, expect=dict) if os.path.exists(meta_path) else None
        if old is not None:
            store.check_meta({"dim": 1, "counts": {}, **old}, meta_path)

        kind = embedder_kind(model)
        embedder = get_embedder(model, device=str(info.device) if device is None else device,
                                **kind_options(model, options))
        # a kind fitted on the corpus keeps its fit in EMB (kind.state_file); a rerun resumes it
        state_path = os.path.join(out, kind.state_file) if embedder.needs_fit and kind.state_file else None
        if state_path is not None and os.path.exists(state_path) and not overwrite:
            embedder.resume(state_path)
        embedder.autocast = autocast
        if old is not None and not overwrite and (old.get("embedder") != embedder.spec
                                                       or int(old.get("dim", -1)) != embedder.dim):
            raise MLCDError(f"{meta_path}: {out} holds embeddings of {old.get('embedder')!r} (dim {old.get('dim')}), "
                            f"not {embedder.spec!r} (dim {embedder.dim}); use --overwrite or another --out")
        # every rank has read the folder's state (meta.json, a fitted state file) before rank 0
        # changes it: a rank that joined the lock late would otherwise find rank 0's fresh state
        # file, skip the fit and its barrier, and pair its barriers off by one with rank 0's (a
        # hang, seen under load)
        barrier()
        if info.is_main and overwrite:
            # no old shard may count as finished once this run has begun (before a refit replaces
            # the state file): a run killed halfway must not leave a folder that a plain rerun would
            # complete with rows of two models
            for n in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(out, f"{n}.keys.npy"))
        if embedder.needs_fit:
            if state_path is None:
                raise MLCDError(f"{model}: this embedder needs a fit but its kind names no state_file to keep it in")
            if info.is_main:
                fit_embedder(embedder, shard_paths, batch_size)
                embedder.save(state_path)
            barrier()
            if not info.is_main:
                embedder.load(state_path)
        describe = portable_identity(embedder.identity(), out, embedder.state_key)
        if old is not None and not overwrite and old.get("embedder_info") is not None:
            was = comparable_identity(old["embedder_info"], describe, embedder.state_key)
            differ = store.run_difference(was, {key: describe.get(key) for key in sorted(set(was) | set(describe))})
            if differ:
                raise MLCDError(f"{meta_path}: {out} holds embeddings of another model under the same spec "
                                f"{embedder.spec!r} ({differ}); use --overwrite or another --out")
        if info.is_main:
            os.makedirs(out, exist_ok=True)
            remove_stale_tmp(out)  # left by a killed run (as large as a shard); no rank writes yet
            store.write_meta(out, embedder.spec, embedder.dim, {}, complete=False, embedder_info=describe,
                             shards=os.path.abspath(shards) if isinstance(shards, str) else None)
        barrier()

        mine = shard_paths[info.rank::info.world_size]
        todo = [s for s in mine if overwrite or not store.shard_done(out, shard_name(s))]
        from mlcd_core.reader import read_sizes

        sizes = read_sizes(todo) if todo else {}
        group = max(1, workers)
        t0 = time.perf_counter()
        bar = progress(total=sum(sizes.values()) or None, desc=f"embed {embedder.spec}", unit="img")
        done = 0
        for g in range(0, len(todo), group):
            counts = embed_group(embedder, todo[g: g + group], out, batch_size, workers, bar)
            done += sum(counts.values())
        bar.close()
        seconds = time.perf_counter() - t0
        barrier()
        result = EmbedResult(out=out, spec=embedder.spec, dim=embedder.dim, shards=len(names), shards_done=len(todo),
                             images_done=done, seconds=seconds)
        if info.is_main:
            counts = {}
            for n in names:
                if not store.shard_done(out, n):
                    raise MLCDError(f"{os.path.join(out, n + '.npy')}: shard {n} was not embedded (a rank failed?)")
                counts[n] = store.npy_info(os.path.join(out, f"{n}.npy")).shape[0]
            store.write_meta(out, embedder.spec, embedder.dim, counts, complete=True, embedder_info=describe,
                             shards=os.path.abspath(shards) if isinstance(shards, str) else None,
                             seconds_rank0=seconds, images_rank0=done, shards_done_this_run_rank0=len(todo),
                             world_size=info.world_size)
            result.counts = counts
            print(f"mlcd embed: {sum(counts.values())} images in {len(names)} shards -> {out} "
                  f"({embedder.spec}, dim {embedder.dim}; {len(todo)} shards embedded on rank 0, "
                  f"{done / max(seconds, 1e-9):.0f} img/s)", file=sys.stderr)
        barrier()
        return result


def main(argv: list[str] | None = None) -> int:
    """``mlcd embed``'s command line: the flags of :func:`build_parser` -> :func:`embed`."""
    a = build_parser().parse_args(argv)
    embed(a.shards, a.out, a.model, batch_size=a.batch_size, workers=a.workers, device=a.device,
          autocast=not a.no_autocast, overwrite=a.overwrite, **{o.name: getattr(a, o.name) for o in embedder_options()})
    return 0


if __name__ == "__main__":
    from clustering import embed as _stage  # the module under its own name, as `mlcd embed` runs it
    from mlcd_core.stage import run_main

    sys.exit(run_main("embed", _stage.main, sys.argv[1:]))
