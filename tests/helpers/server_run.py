"""Child process for tests/test_resume.py: the server's run, with the real ClientApps, in one process.

  python server_run.py RUN_DIR [--pause-after-grpo-step N MARKER]

Runs ``run_server`` (every phase, or a resume of a stopped run) over ``InProcessGrid``: real
Flower messages to the real ClientApp of each client folder of the run (``partition-id`` i), no
network. Node ids start at ``--first-node`` (default 100), so a resumed run can be given new ones
as a new simulation would.

``--pause-after-grpo-step N MARKER``: when the N-th GRPO scoring request has been answered (the
clients have released and ledgered their scores for that step, the server has not yet taken the
step), write MARKER and wait up to 10 minutes, so that the test can SIGKILL the process at that
exact point; ``MARKER`` holds the checkpoint folders on disk at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_key, _value)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--pause-after-grpo-step", nargs=2, metavar=("N", "MARKER"))
    parser.add_argument("--first-node", type=int, default=100)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from mor_secure.config import load_config
    from mor_secure.deploy.inproc import InProcessGrid
    from mor_secure.federation.channel import Channel
    from mor_secure.federation.client_app import make_client_app
    from mor_secure.federation.orchestrator import run_server
    from mor_secure.quiet import quiet_libraries

    quiet_libraries()
    run_dir = Path(args.run_dir)
    if args.pause_after_grpo_step:
        n, marker = int(args.pause_after_grpo_step[0]), Path(args.pause_after_grpo_step[1])
        score = Channel.score
        calls = []

        def paused_score(self, *a, phase, **kw):
            out = score(self, *a, phase=phase, **kw)
            if phase == "grpo":
                calls.append(1)
                if len(calls) == n:
                    ckpts = sorted(p.name for p in (run_dir / "grpo_trainer").glob("checkpoint-*"))
                    marker.write_text(json.dumps({"grpo_step": n, "checkpoints": ckpts}))
                    time.sleep(600)  # the test kills this process here
                    sys.exit(3)
            return out

        Channel.score = paused_score
    n_clients = len(load_config(run_dir / "config.yaml").clients)
    grid = InProcessGrid(make_client_app(run_dir),
                         {args.first_node + i: {"partition-id": i} for i in range(n_clients)})
    run_server(run_dir, grid, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
