"""Keep third-party chatter out of the user's terminal (our own warnings and errors still show)."""

from __future__ import annotations

import logging
import os
import warnings


class _DropFlowerNotices(logging.Filter):
    """Drop Flower's notice that ``run_simulation`` is deprecated: ``mor-secure run`` uses it on
    purpose (one process, progress bars, the run folder) and ``flwr run .`` is documented."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    for module in ("opacus", "torch", "transformers", "trl", "peft", "numpy", "datasets"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Opacus' per-sample hooks on a model whose inputs need no grad: expected, harmless
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False  # Flower prints through its own handler; no second copy via root
    if not any(isinstance(f, _DropFlowerNotices) for f in flwr_log.filters):
        flwr_log.addFilter(_DropFlowerNotices())
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - dp-accounting brings absl
        pass
    logging.getLogger("absl").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
