"""mlcd: an open pretraining framework for MLCD vision encoders.

Install with ``pip install -e .[hf,dev]`` (the Makefile does this in ``.venv``).
torch and torchvision are pinned together: each torchvision release requires one exact torch
release, so the two ranges below always resolve to a matching pair.  The Makefile installs
the exact pair this project is tested with (``TORCH_PIN`` there).
"""
from glob import glob

from setuptools import find_packages, setup

# The floors were checked on 3 December 2026 by installing the old ones (torch 2.4, open_clip 2.24):
# torch < 2.7 lacks what the FSDP2 path uses (public fully_shard 2.6, dcp.load(no_dist=) 2.7) and
# transformers' save/load needs torch.distributed.tensor (2.5); open_clip takes weights_only= from
# 3.0, which needs timm 1.0.17.  At these floors (torch 2.7.1, torchvision 0.22.1, transformers 4.52.1,
# faiss-cpu 1.8.0, numpy 1.24) the fast tier and the FSDP/DCP tests pass, except that faiss 1.8.0's
# IVF search beside torch 2.7.1 aborted now and then under pytest-xdist (two OpenMP runtimes, likely).
INSTALL_REQUIRES = [
    "torch>=2.7,<=2.14.1",
    "torchvision>=0.22,<=0.29.1",
    "faiss-cpu>=1.8,<2",
    "webdataset>=0.2.86,<2",
    "open_clip_torch>=3.0,<4",
    "tensorboard>=2.14,<3",
    "numpy>=1.24,<3",
    "pillow>=10,<14",
    "pyyaml>=6,<7",
    "tqdm>=4.64,<5",
    "matplotlib>=3.7,<4",
    # the resnet family is timm's ResNet (its `channels` argument came in 1.0.8); open_clip 3.0 needs 1.0.17
    "timm>=1.0.17,<2",
]

EXTRAS = {
    # Hugging Face export / import (MLCDVisionModel landed in transformers 4.52).
    "hf": ["transformers>=4.52,<6", "safetensors>=0.4.3,<1"],
    # faiss on GPU: install the faiss-gpu build matching your CUDA (conda or a cuXX wheel).
    "gpu": ["faiss-gpu>=1.8,<2"],
    # Optional fused optimisers; apex must be built against your torch/CUDA, see README.
    "apex": ["apex"],
    "dev": [
        "pytest>=7",
        "pytest-timeout>=2.1",
        # `make test-fast` runs the unit tier on 2 workers (-n 2); from 3.6.1 each worker runs
        # its tests in its main thread, where the trainer's signal handlers can be installed
        "pytest-xdist>=3.6.1,<4",
        "scikit-learn>=1.3",
        "transformers>=4.52,<6",
        "safetensors>=0.4.3,<1",
        # the linter .ci/run runs (ruff.toml); a minor release can add rules, so one minor line
        "ruff>=0.17,<0.18",
    ],
}

setup(
    name="mlcd",
    version="0.1.0",
    description="Pretraining framework for MLCD (multi-label cluster discrimination) vision encoders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # layers (docs/architecture.md): mlcd_core <- clustering <- mlcd_train
    packages=find_packages(include=["mlcd_core", "mlcd_core.*", "clustering", "clustering.*",
                                    "mlcd_train", "mlcd_train.*"]),
    include_package_data=True,
    package_data={"mlcd_train": ["data/sample/*"]},
    # the YAML presets live beside the packages (configs/); a wheel carries them here, where
    # mlcd_train.config looks when there is no source tree
    data_files=[("share/mlcd/configs", sorted(glob("configs/*.yaml")))],
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mlcd=mlcd_train.cli:main"]},
)
