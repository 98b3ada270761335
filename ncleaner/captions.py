"""Cheap per-caption columns of the report: length in characters and words, and language.

These are the inputs of DataComp's basic filter (caption length, language, image size), so that
it is one ``--where`` over the report (docs/commands.md). The language is py3langid's (a fork of
langid.py whose model ships inside the package: nothing is downloaded), with its probability
normalised over its 97 languages; DataComp used fastText's identifier, so thresholds are not the
same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def caption_columns(captions: Sequence[str | None]) -> dict[str, list]:
    """Per caption: ``caption_chars``, ``caption_words`` (runs of non-space characters),
    ``language`` (ISO 639-1, e.g. ``en``) and ``language_prob``; None for a sample without one."""
    identify = _identifier().classify
    columns: dict[str, list] = {"caption_chars": [], "caption_words": [], "language": [], "language_prob": []}
    for caption in captions:
        if caption is None:
            for values in columns.values():
                values.append(None)
            continue
        language, probability = identify(caption)
        columns["caption_chars"].append(len(caption))
        columns["caption_words"].append(len(caption.split()))
        columns["language"].append(language)
        columns["language_prob"].append(float(np.float32(probability)))
    return columns
