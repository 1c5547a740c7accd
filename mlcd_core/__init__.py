"""mlcd_core: the layer every other mlcd package stands on (see docs/architecture.md, "Layers").

- :mod:`mlcd_core.errors`: :class:`~mlcd_core.errors.MLCDError`, the one-line user error.
- :mod:`mlcd_core.io`: atomic writes, safe reads of hostile files (json, npy, torch).
- :mod:`mlcd_core.args`: typed argparse values (positive_int, float_between, ...).
- :mod:`mlcd_core.dist`: torchrun / SLURM process groups, rank helpers, barriers.
- :mod:`mlcd_core.progress`: tqdm bars on rank 0.
- :mod:`mlcd_core.reader`: the WebDataset shard reader (ShardDataset, list_shards, ...).
- :mod:`mlcd_core.stage`: ``run_main``, a stage's command line turned into an exit status.
- :mod:`mlcd_core.lock`: ``output_lock``, one run per output folder.

A core module imports only the standard library, third-party packages and other core
modules: never ``clustering`` or ``mlcd_train`` (tests/test_layers.py checks it).  The old
names (``mlcd_train.utils.io``, ``mlcd_train.data.reader``, ...) stay aliases of these modules.
"""
