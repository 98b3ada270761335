"""ncleaner: find image-caption pairs whose caption does not describe the image.

The package API mirrors the command line::

    from ncleaner import fit, score, filter_shards
    fit("shards/", "model/")
    score("shards/", "model/", "report/")
    filter_shards("shards/", "report/", "clean/", threshold=0.5)
"""

__version__ = "0.1.0"
