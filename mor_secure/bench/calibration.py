"""DP-SGD noise calibration computed once per distinct setting, for benchmarks that train many
reward models with the same settings.

The calibration (seconds of accountant search) is a pure function of the number of records,
epsilon, delta, epochs, batch size and clipping norm, so reusing it changes no result: each
client gets exactly what it would compute itself. It happens before the first training step,
so no step time changes either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock


@contextlib.contextmanager
def dpsgd_plans_once() -> Iterator[dict]:
    """Within the block, ``rewards.train.plan_dpsgd`` is memoised; yields the cache."""
    from mor_secure.rewards import train as train_module

    real, plans = train_module.plan_dpsgd, {}

    def plan_once(num_records, settings):
        key = (num_records, settings.target_epsilon, settings.delta, settings.epochs, settings.batch_size,
               settings.max_grad_norm)
        if key not in plans:
            plans[key] = real(num_records, settings)
        return plans[key]

    with mock.patch.object(train_module, "plan_dpsgd", plan_once):
        yield plans
