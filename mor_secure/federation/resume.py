"""Resuming a server run that stopped part-way (``mor-secure run --resume RUN_DIR``).

What a run folder keeps that a resumed run reuses, phase by phase (``run_record.json``
``phases_completed`` says which phases ended):

* ``rm_training``: each client's ``rm/complete`` on its own disk; a client asked to train again
  answers from disk without training or writing to its ledger. The server only asks again
  because node ids change between runs.
* ``warmup``: ``policy_base/`` (also the frozen GRPO reference).
* ``router_fit``: ``router.pt``.
* ``grpo``: ``policy_aligned/``; while GRPO runs, TRL checkpoints (policy, optimiser, scheduler,
  RNG and trainer state) every ``grpo.checkpoint_steps`` steps under ``grpo_trainer/``, and a
  resumed GRPO continues from the newest complete one.
* ``evaluation``: ``metrics/evaluation.json``.

Clients' ledgers are never touched by the server: every release a client made before the stop
stays in its ledger, and budgets are checked against the whole ledger, so a resumed run spends
from what is left. GRPO steps after the last checkpoint are scored again on resume; those are new
releases and each is recorded as one.

One server process per run folder: the running server holds an exclusive ``flock`` on
``server.lock`` (released by the kernel when the process dies, SIGKILL included), and a second
server on the same folder is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

from mor_secure.errors import ConfigError

LOCK_FILE = "server.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def read_record(run_dir: Path) -> dict:
    """The run record of ``run_dir``; ConfigError naming the fix when it is not a run folder."""
    run_dir = Path(run_dir)
    fix = ("pass the folder `mor-secure run` printed as 'run folder: ...', or start a new run with "
           "`mor-secure run CONFIG`")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such folder; {fix}")
    record_path = run_dir / "run_record.json"
    if not (run_dir / "config.yaml").is_file() or not record_path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (it has no config.yaml and run_record.json); {fix}")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume {run_dir}: run_record.json is unreadable ({exc}); {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise ConfigError(f"--resume {run_dir}: run_record.json names no run_id, so this is not a run folder; {fix}")
    return record


def check_resumable(run_dir: Path) -> dict:
    """The run record, if ``run_dir`` is a run that can be resumed; else ConfigError with the fix."""
    record = read_record(run_dir)
    if record.get("status") == "completed":
        phases = ", ".join(record.get("phases_completed", []))
        raise ConfigError(f"--resume {run_dir}: this run already completed ({phases}); nothing to resume."
                          " Its results are in that folder (`mor-secure report` rewrites the "
                          "privacy report); for a new run use `mor-secure run CONFIG`")
    with RunLock(run_dir):  # refused at once if a server is still running on this folder
        pass
    return record


class RunLock:
    """Exclusive, non-blocking ``flock`` on ``<run>/server.lock`` for one server process."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run folder {self.path.parent} is in use by a running server (pid {holder}); "
                              "wait for it to finish or stop it, then resume with "
                              f"`mor-secure run --resume {self.path.parent}`") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def checkpoint_step(folder: Path) -> int | None:
    """``N`` if ``folder`` is a complete TRL checkpoint ``checkpoint-N`` (its trainer state, written
    last, parses and says step N), else None (absent, or cut short by a crash while saving)."""
    m = _CHECKPOINT.match(folder.name)
    state = folder / "trainer_state.json"
    if m is None or not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, json.JSONDecodeError):
        return None
    return int(m.group(1)) if step == int(m.group(1)) else None


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete GRPO checkpoint under ``trainer_dir``, or None."""
    if not Path(trainer_dir).is_dir():
        return None
    complete = [(s, p) for p in Path(trainer_dir).iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None]
    return max(complete)[1] if complete else None


def checkpoint_history(checkpoint: Path) -> list[dict]:
    """The per-step reward rows logged up to ``checkpoint`` (TRL's log history), in the format of
    ``alignment.grpo.run_grpo``'s history."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    nan = float("nan")
    return [{"step": int(row["step"]), "reward": float(row["reward"]),
             "reward_std": float(row.get("reward_std", nan)), "kl": float(row.get("kl", nan)),
             "loss": float(row.get("loss", nan))}
            for row in state.get("log_history", []) if "reward" in row and "step" in row]
