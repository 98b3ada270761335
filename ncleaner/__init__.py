"""ncleaner: find image-caption pairs whose caption does not describe the image.

The package API mirrors the command line::

    from ncleaner import fit, score, filter_shards
    fit("shards/", "model/")
    score("shards/", "model/", "report/")
    filter_shards("shards/", "report/", "clean/", auto=True)
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "fit": "ncleaner.train",
    "score": "ncleaner.report",
    "read_report": "ncleaner.report",
    "filter_shards": "ncleaner.filtering",
    "DisNCLConfig": "ncleaner.config",
    "NcleanerModel": "ncleaner.model",
    "NcleanerError": "ncleaner.errors",
    "expand_shards": "ncleaner.shards",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `ncleaner --help` does not pay for importing torch.
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'ncleaner' has no attribute {name!r}")
