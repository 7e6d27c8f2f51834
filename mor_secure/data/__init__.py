"""The mor_secure benchmark (DESIGN.md §6): shapes and digits tracks, built in code.

See :mod:`mor_secure.data.families` for the question families and their oracles and
:mod:`mor_secure.data.benchmark` for samples, non-IID client pairs and the server's sets.
"""

from mor_secure.data.benchmark import (
    first_word,
    load_split,
    make_client_pairs,
    make_samples,
    make_server_sets,
    oracle_correct,
    write_benchmark,
)
from mor_secure.data.families import (
    FAMILIES,
    TRACKS,
    QuestionFamily,
    families_for_track,
    get_family,
    vocabulary,
)

__all__ = [
    "FAMILIES", "TRACKS", "QuestionFamily", "families_for_track", "get_family", "vocabulary",
    "make_samples", "make_client_pairs", "make_server_sets", "write_benchmark", "load_split",
    "oracle_correct", "first_word",
]
