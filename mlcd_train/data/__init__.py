"""Data: the shard writer (``mlcd shards``), the shard reader and the shipped sample corpus.

- :mod:`mlcd_train.data.shards`: ``mlcd shards`` turns an image folder, IDX files or a list
  file into WebDataset tar shards (``PREFIX-000000.tar`` + ``sizes.json``).
- :mod:`mlcd_train.data.reader`: :class:`~mlcd_train.data.reader.ShardDataset`, the reader
  every stage uses (never unpickles, splits shards over ranks and workers, resampled mode
  with exact resume).
- :mod:`mlcd_train.data.sample`: the shipped Fashion-MNIST sample (``sample_paths()``) and
  the full Debian dataset (``fashion_mnist_full_paths()``).
"""
