"""The server's side of the reward channel: send requests to the clients, check what comes back.

Every reply is checked before use (``protocol.decode_*``): a refusal, an error, a malformed,
non-finite, out-of-range or wrong-length score vector excludes that client from that request
(the router renormalises over the rest) and is written to the run's event log with its reason.
A client that refuses for budget is not asked again in this run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from PIL import Image

from mor_secure.errors import ProtocolError
from mor_secure.federation import protocol as P

log = logging.getLogger(__name__)


@dataclass
class ClientInfo:
    node_id: int
    hello: P.Hello


@dataclass
class Channel:
    grid: Grid
    run_id: str
    events_path: Path
    timeout_s: float
    clients: dict[str, ClientInfo] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # router column order
    exhausted: set[str] = field(default_factory=set)
    bytes_sent: int = 0

    def note(self, kind: str, **detail) -> None:
        """Append one line to the run's event log (refusals, rejections, dropouts)."""
        row = {"time": time.time(), "kind": kind, **detail}
        with open(self.events_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.warning("%s: %s", kind, detail)

    # -- phase 1 -----------------------------------------------------------------------------------
    def train_all(self, timeout_s: float) -> dict[str, ClientInfo]:
        node_ids = sorted(self.grid.get_node_ids())
        content = RecordDict({"cfg": ConfigRecord({"run_id": self.run_id})})
        msgs = [Message(content=content, message_type="train", dst_node_id=n) for n in node_ids]
        for reply in self.grid.send_and_receive(msgs, timeout=timeout_s):
            src = reply.metadata.src_node_id
            if reply.has_error():
                self.note("train_failed", node_id=src, code=reply.error.code, reason=reply.error.reason)
                continue
            try:
                hello = P.decode_hello(reply.content)
            except ProtocolError as exc:
                self.note("rejected", node_id=src, phase="rm_training", reason=str(exc))
                continue
            self.clients[hello.client] = ClientInfo(src, hello)
        self.order = sorted(self.clients)
        return self.clients

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, images: list[Image.Image], questions: list[str], responses: list[str],
              image_index: np.ndarray, *, phase: str, purpose: str) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, K) and the mask of clients present (N, K), K = ``self.order``."""
        req = P.ScoreRequest(P.images_to_array(images), list(questions), list(responses), image_index,
                             run_id=self.run_id, phase=phase, purpose=purpose)
        content = P.encode_score_request(req)
        targets = [n for n in self.order if n not in self.exhausted]
        msgs = [Message(content=content, message_type="query.score", dst_node_id=self.clients[n].node_id)
                for n in targets]
        self.bytes_sent += len(targets) * (req.images.nbytes + sum(len(r) for r in responses))
        n, k = len(responses), len(self.order)
        scores, present = np.zeros((n, k)), np.zeros((n, k), dtype=bool)
        by_node = {self.clients[name].node_id: name for name in targets}
        replies = self.grid.send_and_receive(msgs, timeout=self.timeout_s) if msgs else []
        answered = set()
        for reply in replies:
            name = by_node.get(reply.metadata.src_node_id)
            if name is None:
                continue
            answered.add(name)
            col = self.order.index(name)
            if reply.has_error():
                kind = "budget_refused" if reply.error.code == P.ERR_BUDGET_REFUSED else "client_error"
                if kind == "budget_refused":
                    self.exhausted.add(name)
                self.note(kind, client=name, phase=phase, code=reply.error.code, reason=reply.error.reason)
                continue
            try:
                info = self.clients[name].hello
                if P.client_name(reply.content) != name:
                    raise ProtocolError("reply names a different client than the node it came from")
                scores[:, col] = P.decode_scores(reply.content, expected=n,
                                                 limit=P.score_limit(info.clip_bound, info.noise_std))
                present[:, col] = True
            except ProtocolError as exc:
                self.note("rejected", client=name, phase=phase, reason=str(exc))
        for name in set(targets) - answered:
            self.note("dropped", client=name, phase=phase, reason=f"no reply within {self.timeout_s}s")
        return scores, present
