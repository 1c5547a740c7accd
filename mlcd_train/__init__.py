"""mlcd_train: models, Partial-FC loss, data, trainer and export for MLCD vision encoders."""
__version__ = "0.1.0"
