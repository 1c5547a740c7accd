"""mlcd_train: models, Partial-FC loss, data, trainer and export for MLCD vision encoders,
and the applications (``mlcd`` cli, pipeline, probe, demo) above clustering.

Importing it registers the ``mlcd:PATH`` embedder (our own tower, :mod:`mlcd_train.embedder`)
with :mod:`clustering.embedders`: the registry lives in the lower layer, the kind that needs
the towers in the package that has them.
"""
__version__ = "0.1.0"


def _mlcd_embedder(arg: str, **opts):
    from mlcd_train.embedder import MLCDEmbedder

    return MLCDEmbedder(arg, **opts)


def _register() -> None:
    from clustering.embedders import register_embedder

    register_embedder("mlcd", _mlcd_embedder, usage="mlcd:PATH", order=30,
                      missing_arg="mlcd embedder needs a checkpoint or export: mlcd:PATH", arg_is_path=True)


_register()
