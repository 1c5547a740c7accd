"""The ``mlcd`` command: one subcommand per pipeline stage.

Each stage lives in its own module with a ``main(argv) -> int`` function, so tests and
Python users drive it without a shell; this dispatcher only imports the stage that is asked
for (importing torch and faiss is slow, ``mlcd --help`` should not wait for it).
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line description)
STAGES = {
    "shards": ("mlcd_train.data.shards", "convert an image folder, IDX files or a list file into WebDataset shards"),
    "embed": ("clustering.embed", "embed every image of a shard folder with a teacher (open_clip, hf, mlcd, pca)"),
    "cluster": ("clustering.kmeans", "spherical k-means over the embeddings (faiss, two-level, distributed, torch)"),
    "assign": ("clustering.assign", "give every image its top-l nearest centres as labels"),
    "train": ("mlcd_train.train", "train a ViT with the MLCD / Unicom / MLC loss (torchrun-aware)"),
    "export": ("mlcd_train.export", "export the backbone of a training checkpoint as a flat native state dict"),
    "convert": ("mlcd_train.convert", "convert a native export to a Hugging Face directory (or import one)"),
    "probe": ("mlcd_train.probe", "linear probe and k-NN on frozen features"),
    "plan": ("mlcd_train.plan", "GPU memory per rank of a training config (DDP / FSDP, checkpointing) and the "
             "largest batch that fits"),
    "pipeline": ("mlcd_train.pipeline", "run shards -> embed -> cluster -> assign -> train -> export -> probe from a "
                 "YAML, round after round (the student becomes the next round's teacher)"),
    "demo": ("mlcd_train.demo", "run the whole pipeline end to end on the shipped Fashion-MNIST sample"),
}


def _usage() -> str:
    width = max(len(k) for k in STAGES)
    lines = [
        "usage: mlcd SUBCOMMAND [options]   (mlcd SUBCOMMAND --help for its options)",
        "",
        "MLCD pretraining pipeline: shards -> embed -> cluster -> assign -> train -> export -> convert -> probe",
        "",
        "subcommands:",
    ]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in STAGES.items()]
    return "\n".join(lines)


def run_stage(name: str, argv: list[str]) -> int:
    """Run stage ``name`` with ``argv``; returns the exit status (never raises MLCDError)."""
    from mlcd_core.stage import run_main

    module = importlib.import_module(STAGES[name][0])  # every stage ships: a failed import is a real error
    return run_main(name, module.main, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from mlcd_train import __version__

        print(f"mlcd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"mlcd: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_stage(name, rest)


if __name__ == "__main__":
    sys.exit(main())
