"""Child process for tests/test_crash_safety.py: a client that trains, then releases scores in a loop.

Two ways to run it (always with ``sys.executable``):

  python crash_client.py CLIENT_FOLDER WIRE_LOG MAX_RELEASES
      one client process (a cold interpreter: imports, ClientNode, train, score loop).

  python crash_client.py --serve
      a fork server, so that many kills do not each pay ~5 s of imports: it imports everything
      once (computing nothing), then reads lines ``run FOLDER WIRE_LOG MAX_RELEASES`` on stdin,
      forks one client process per line and answers ``pid N``; ``wait N`` reaps that child and
      answers ``status S`` (``os.waitpid`` status). A child is reaped only when asked, so its pid
      cannot be reused before the parent has sent its SIGKILL.

Besides the client's own ledger, each client process appends what it *actually does* to WIRE_LOG,
a separate append-only JSON-lines file, fsync'd after every line, read by the test outside the
ledger (every record has ``pid`` and wall-clock ``t``):

  {"ev": "start"}                                  the client process started
  {"ev": "train_start"} / {"ev": "train_done"}     around ClientNode.train
  {"ev": "dp_noise", "noise_multiplier", "sample_rate", "steps_per_epoch", "max_grad_norm"}
        the mechanism Opacus was actually configured with (captured at PrivacyEngine.make_private)
  {"ev": "release", "noise_std", "clip_bound", "count", "seq", "time"}
        written right after ClientNode.score returns, i.e. the moment the scores would be sent;
        ``seq`` is the ledger entry the client says covers it, ``time`` the wall clock (UTC, ISO)
  {"ev": "refused", "at": "train"|"score"}         the client's budget guard refused a training or a release
  {"ev": "done"}                                    MAX_RELEASES releases made

The test kills client processes with SIGKILL at random moments.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_key, _value)


def wire(fd: int, **record) -> None:
    record.update(pid=os.getpid(), t=time.time())
    os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
    os.fsync(fd)


def _imports():
    import numpy as np
    import opacus
    import torch

    torch.set_num_threads(1)
    from mor_secure.errors import BudgetExceededError
    from mor_secure.federation import protocol as P
    from mor_secure.federation.client_node import ClientNode
    from mor_secure.quiet import quiet_libraries

    quiet_libraries()

    return np, opacus, BudgetExceededError, P, ClientNode


def client(folder: str, wire_path: str, max_releases: int) -> int:
    fd = os.open(wire_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    wire(fd, ev="start")
    np, opacus, BudgetExceededError, P, ClientNode = _imports()

    make_private = opacus.PrivacyEngine.make_private

    def observed_make_private(self, *, noise_multiplier, max_grad_norm, **kwargs):
        out = make_private(self, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, **kwargs)
        loader = out[2]
        wire(fd, ev="dp_noise", noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
             sample_rate=float(loader.sample_rate), steps_per_epoch=len(loader))
        return out

    opacus.PrivacyEngine.make_private = observed_make_private

    node = ClientNode(folder)
    wire(fd, ev="train_start")
    try:
        node.train("crash-run", progress=False)
    except BudgetExceededError:  # a retraining after earlier kills would cross the budget
        wire(fd, ev="refused", at="train")
        return 0
    wire(fd, ev="train_done")

    n = 4
    req = P.ScoreRequest(np.zeros((2, 32, 32, 3), np.uint8), ["what colour is the shape ?"] * 2,
                         ["red"] * n, np.arange(n) % 2, run_id="crash-run", phase="grpo", purpose="crash test")
    bound, sigma = node.config.scores.clip_bound, node.config.scores.noise_std
    for _ in range(max_releases):
        try:
            scores = node.score(req)
        except BudgetExceededError:
            wire(fd, ev="refused", at="score")
            return 0
        # The scores exist and would be sent now: this is the release, observed outside the ledger.
        assert scores.shape == (n,)
        wire(fd, ev="release", noise_std=sigma, clip_bound=bound, count=n, seq=len(node.ledger),
             time=datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    wire(fd, ev="done")
    return 0


def serve() -> int:
    _imports()  # import once, compute nothing: children start warm
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            folder, wire_path, max_releases = args
            pid = os.fork()
            if pid == 0:  # the client process
                code = 1
                try:
                    sys.stdin.close()
                    os.dup2(2, 1)  # the parent's stdout carries the protocol: nothing else may go there
                    code = client(folder, wire_path, int(max_releases))
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(args[0]), 0)
            print(f"status {status}", flush=True)
        else:
            print(f"error unknown command {cmd!r}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    sys.exit(client(sys.argv[1], sys.argv[2], int(sys.argv[3])))
