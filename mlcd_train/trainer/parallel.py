"""How the backbone is spread over ranks (``train.parallel``) and its sharded checkpoints.

- ``ddp`` (default): ``DistributedDataParallel``; every rank holds the whole backbone and
  its optimiser state; rank 0 writes ``model.pt`` / ``optimizer.pt`` (trainer/checkpoint.py).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per transformer block
  (ViT) or residual stage (ResNet ``layer1`` .. ``layer4``) plus the root (stem, embeddings,
  ``ln_post`` / ``proj`` or ``fc``).  Parameters, gradients and AdamW state are sharded over
  the ranks (DTensors on dim 0); a unit's full parameters exist only around its forward and
  backward.  Gradients are averaged over the ranks by the reduce-scatter as DDP's all-reduce
  does, so both see the same step (the Partial FC's world_size x embedding gradient relies
  on that averaging).  On CUDA the parameters are cast to bf16 for compute (fp16 for
  ``train.precision=fp16``), gradients reduced in fp32; on the CPU the parameters are fp32 (``train.cpu_autocast``
  autocasts the compute to bf16 on top of that).
  On one process nothing is wrapped (as DDP).

Sharded checkpoints (``fsdp``): ``model_dcp/`` and ``optim_dcp/`` in the step folder, written
by ``torch.distributed.checkpoint`` (DCP): every rank writes its own part
(``__R_0.distcp``), rank 0 the ``.metadata``.  They are written under hidden temporary names
(``.model_dcp.tmp``) and renamed by rank 0 once every rank has finished (``meta.json`` comes
after that), so a folder named ``model_dcp`` is always whole.  State dicts go through
``torch.distributed.checkpoint.state_dict`` (keys are parameter names, so a load reshards to
any number of ranks, or to a plain model on one process).  DCP's ``.metadata`` is a pickle;
it is read here through an unpickler that admits only DCP's metadata classes and a few torch
types (:class:`SafeReader`), the tensors with ``torch.load(weights_only=True)`` (DCP's own):
loading a checkpoint runs no code.  ``train.async_save=true``: ``dcp.async_save`` stages the
state to CPU memory and writes it in a thread on a gloo group of its own; the trainer
finishes the checkpoint (rename, ``meta.json``) at the first step boundary where every rank's
write is done, or before the next save / at the end.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.io import TMP_SUFFIX

PARALLEL = ("ddp", "fsdp")
MODEL_DCP, OPTIM_DCP = "model_dcp", "optim_dcp"


def uses_fsdp(cfg, info) -> bool:
    """True when the backbone is FSDP-sharded (train.parallel=fsdp on more than one rank)."""
    return cfg.train.parallel == "fsdp" and info.distributed


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: transformer blocks (ViT) or residual stages (ResNet)."""
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if blocks is not None:
        return list(blocks)
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(s is not None for s in stages):
        return stages
    raise MLCDError(f"train.parallel=fsdp: {type(model).__name__} has neither transformer.resblocks nor "
                    "layer1..layer4 to shard")


def mixed_precision(precision: str, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32 compute and reduction (the CPU, or precision=fp32)


def parallelize(model: nn.Module, cfg, info) -> nn.Module:
    """Wrap ``model`` for ``cfg.train.parallel``; returns the module the step calls.

    ``ddp``: a DistributedDataParallel around ``model``.  ``fsdp``: ``fully_shard`` applied in
    place (``model`` itself becomes the FSDP root and is returned).  One process: ``model``."""
    if not info.distributed:
        return model
    if cfg.train.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mp = mixed_precision(cfg.train.precision, info.device)
        units = shard_units(model)
        for i, unit in enumerate(units):
            # the last unit's parameters are needed again at once by backward: keep them
            fully_shard(unit, mp_policy=mp, reshard_after_forward=i < len(units) - 1)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded (DTensor) gradients: the norm of the
    whole gradient (every rank's shards), the same number on every rank."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def full_state_dict(model: nn.Module, sharded: bool) -> dict | None:
    """The backbone's full state dict as CPU tensors (every rank must call it when
    ``sharded``; only rank 0 gets it then, the others get None)."""
    if not sharded:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


# ----------------------------------------------------------------------------- safe reading

# what DCP's metadata pickles hold: its dataclasses and enums, torch sizes/dtypes/layouts
# (a layout is pickled as torch.serialization._get_layout(name), a lookup by name) and the
# checkpoint id (a path); no other callable is admitted
_SAFE_GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                 ("torch", "Size"), ("torch", "float32"), ("torch", "float64"), ("torch", "float16"),
                 ("torch", "bfloat16"), ("torch", "int64"), ("torch", "int32"), ("torch", "int16"),
                 ("torch", "int8"), ("torch", "uint8"), ("torch", "bool"), ("torch", "strided"),
                 ("torch", "contiguous_format"), ("torch", "preserve_format"), ("torch", "channels_last"),
                 ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("builtins", "slice"), ("torch._utils", "_rebuild_tensor_v2")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which a checkpoint's metadata "
                                     "never needs")


def read_dcp_metadata(path: str | os.PathLike, name: str = ".metadata"):
    """DCP's ``.metadata`` of a checkpoint folder, unpickled with a whitelist (see module doc)."""
    p = Path(path) / name
    if not p.is_file() or p.is_symlink():
        raise MLCDError(f"{p}: missing or not a regular file (incomplete sharded checkpoint?)")
    if p.stat().st_size > (1 << 30):
        raise MLCDError(f"{p}: larger than 1 GiB; not DCP metadata")
    try:
        return _MetadataUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as exc:
        raise MLCDError(f"{p}: not readable as DCP metadata ({type(exc).__name__}: {str(exc)[:200]})") from None


def safe_reader(path: str | os.PathLike):
    """A DCP FileSystemReader whose metadata read runs no code."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            meta = read_dcp_metadata(self.path, ".metadata" if rank is None else f"__{int(rank)}.metadata")
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(os.fspath(path))


# ----------------------------------------------------------------------------- save / load

def _tmp(folder: Path, name: str) -> Path:
    return folder / f".{name}{TMP_SUFFIX}"


def is_sharded_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MODEL_DCP).is_dir()


class PendingSave:
    """What :func:`save_sharded` started; ``done()`` on this rank, ``wait()`` for it."""

    def __init__(self, futures: list):
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        for f in self.futures:
            f.result()


def clear_sharded(folder: Path) -> None:
    """Rank 0, before a save into ``folder``: drop DCP folders (and temporaries) of an earlier run."""
    for name in (MODEL_DCP, OPTIM_DCP):
        for p in (folder / name, _tmp(folder, name)):
            if p.is_symlink() or p.is_file():  # the entry itself goes, never what a link points to
                p.unlink()
            elif p.exists():
                shutil.rmtree(p)


def save_sharded(folder: Path, model: nn.Module, optimizer, async_group=None) -> PendingSave:
    """Every rank: write its part of the backbone and optimiser state under the temporary
    names; with ``async_group`` (a gloo group) in the background (``dcp.async_save``).
    :func:`finish_sharded` (rank 0, after every rank is done) gives them their names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    futures = []
    for name, sd in ((MODEL_DCP, msd), (OPTIM_DCP, osd)):
        target = os.fspath(_tmp(folder, name))
        if async_group is not None:
            resp = dcp.async_save(sd, checkpoint_id=target, process_group=async_group)
            futures.append(getattr(resp, "upload_completion", resp))
        else:
            dcp.save(sd, checkpoint_id=target)
    return PendingSave(futures)


def finish_sharded(folder: Path) -> None:
    """Rank 0, once every rank's write is complete: the temporary folders take their names."""
    for name in (MODEL_DCP, OPTIM_DCP):
        tmp = _tmp(folder, name)
        if not (tmp / ".metadata").is_file():
            raise MLCDError(f"{tmp}: sharded save did not complete (no .metadata)")
        os.replace(tmp, folder / name)


def load_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Every rank: load ``model_dcp`` / ``optim_dcp`` into ``model`` (FSDP, DDP's module or a
    plain model) and ``optimizer``, resharded to this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict, get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    try:
        dcp.load(msd, storage_reader=safe_reader(folder / MODEL_DCP))
        dcp.load(osd, storage_reader=safe_reader(folder / OPTIM_DCP))
    except MLCDError:
        raise
    except Exception as exc:  # a missing key / shape mismatch, reported by DCP as CheckpointException
        msg = str(exc).strip().splitlines()
        raise MLCDError(f"{folder}: sharded checkpoint does not fit this model and optimiser "
                        f"({type(exc).__name__}: {' '.join(msg)[:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def load_full_into_sharded(folder: Path, model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Every rank: a ``train.parallel=ddp`` checkpoint (the full ``model.pt`` state dict and the
    ``optimizer.pt`` of ``torch.optim``, keyed by parameter index) into the FSDP-sharded
    ``model`` and its ``optimizer``: the indices are named by the optimiser's parameter order
    (the same parameter groups build both), then torch's ``set_state_dict`` shards them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    try:
        saved = [i for g in optim_sd["param_groups"] for i in g["params"]]
        if len(saved) != len(order):
            raise ValueError(f"{len(saved)} parameters in optimizer.pt, {len(order)} in this model")
        state = {order[int(i)]: v for i, v in optim_sd["state"].items()}
        groups = [dict(g, params=[order[int(i)] for i in g["params"]]) for g in optim_sd["param_groups"]]
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict={"state": state, "param_groups": groups},
                       options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).strip().splitlines())[:300]
        raise MLCDError(f"{folder}: the ddp checkpoint does not fit this fsdp model and optimiser "
                        f"({type(exc).__name__}: {msg})") from None


def read_full_state_dict(dcp_dir: str | os.PathLike, template: dict) -> dict:
    """One process, no process group: the backbone of ``dcp_dir`` (``model_dcp``) as full
    tensors, read into a copy of ``template`` (a plain model's state dict: names and shapes)."""
    import torch.distributed.checkpoint as dcp

    sd = {k: torch.empty_like(v, device="cpu") for k, v in template.items()}
    try:
        dcp.load(sd, storage_reader=safe_reader(dcp_dir), no_dist=True)
    except MLCDError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).strip().splitlines())[:300]
        raise MLCDError(f"{dcp_dir}: sharded checkpoint does not fit its model config ({type(exc).__name__}: "
                        f"{msg})") from None
    return sd
