"""ncleaner: find image-caption pairs whose caption does not describe the image.

The package API mirrors the command line: data positional, every option keyword-only::

    from ncleaner import RunOptions, fit, score, inspect_report, filter_shards
    fit("shards/", "model/")
    score("shards/", "model/", "report/", run=RunOptions(device="cuda", progress=True))
    inspect_report("shards/", "report/", "report.html", keep_fraction=0.8)
    filter_shards("shards/", "report/", "clean/", auto=True)

Where and how a stage runs (engine, device, workers, progress bars) is one ``RunOptions``
object, the same for every stage. Library functions log through
``logging.getLogger("ncleaner....")`` and show no progress bar unless ``RunOptions.progress``.
"""

from importlib import import_module

__version__ = "0.2.0"

_API = {
    "fit": "ncleaner.fitting",
    "FitResult": "ncleaner.fitting",
    "score": "ncleaner.scoring",
    "ScoreResult": "ncleaner.scoring",
    "read_report": "ncleaner.scoring",
    "filter_shards": "ncleaner.filtering",
    "FilterResult": "ncleaner.filtering",
    "Rule": "ncleaner.schema",
    "make_rule": "ncleaner.rules",
    "inspect_report": "ncleaner.inspection",
    "InspectResult": "ncleaner.inspection",
    "inject_noise": "ncleaner.noise",
    "NoiseResult": "ncleaner.noise",
    "evaluate_report": "ncleaner.evaluate",
    "retrieval_metrics": "ncleaner.evaluate",
    "truth_from_report": "ncleaner.evaluate",
    "truth_from_file": "ncleaner.evaluate",
    "detection_by_kind": "ncleaner.evaluate",
    "noise_kinds_from_report": "ncleaner.evaluate",
    "noise_kinds_from_file": "ncleaner.evaluate",
    "DisNCLConfig": "ncleaner.config",
    "RunOptions": "ncleaner.engine",
    "ShardTally": "ncleaner.engine",
    "NcleanerModel": "ncleaner.model",
    "NcleanerError": "ncleaner.errors",
    "UnreadableShard": "ncleaner.errors",
    "expand_shards": "ncleaner.shards",
    "read_shard": "ncleaner.shards",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `ncleaner --help` does not pay for importing torch.
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'ncleaner' has no attribute {name!r}")
