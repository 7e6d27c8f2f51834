"""Hugging Face ``datasets`` storage of benchmark records (images as ``datasets.Image()``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mor_secure.errors import ConfigError

#: Column schema of each kind of split: every column is a string except ``image`` and ``label``.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "pairs": ("image", "family", "question", "chosen", "rejected"),
    "public": ("image", "family", "question"),
    "objective": ("image", "family", "question", "response_a", "response_b", "label"),
    "eval": ("image", "family", "question", "answer"),
    "samples": ("image", "family", "question", "answer"),
}


def _features(columns: Sequence[str]):
    import datasets

    spec: dict[str, Any] = {}
    for col in columns:
        if col == "image":
            spec[col] = datasets.Image()
        elif col == "label":
            spec[col] = datasets.Value("float32")
        else:
            spec[col] = datasets.Value("string")
    return datasets.Features(spec)


def to_dataset(records: Sequence[dict[str, Any]], kind: str):
    """Records (dicts with the columns of ``SCHEMAS[kind]``) as a ``datasets.Dataset``."""
    import datasets

    if kind not in SCHEMAS:
        raise ConfigError(f"unknown split kind {kind!r}; use one of {sorted(SCHEMAS)}")
    columns = SCHEMAS[kind]
    data = {col: [r[col] for r in records] for col in columns}
    return datasets.Dataset.from_dict(data, features=_features(columns))


def save_records(records: Sequence[dict[str, Any]], kind: str, path: str | Path) -> str:
    """Write records with ``Dataset.save_to_disk`` to ``path``; returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_dataset(records, kind).save_to_disk(str(path))
    return str(path)


def load_split(path: str | Path):
    """Load a split written by :func:`save_records` / ``write_benchmark``.

    The ``image`` column decodes to ``PIL.Image.Image`` objects on access.
    """
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"no saved benchmark split at {str(path)!r}; run write_benchmark first")
    return datasets.load_from_disk(str(path))
