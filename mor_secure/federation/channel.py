"""The server's side of the reward channel: send requests to the clients, check what comes back.

Every reply is checked before use (``protocol.decode_*``): a refusal, an error, a malformed,
non-finite, out-of-range or wrong-length score vector excludes that client from that request
(the router renormalises over the rest) and is written to the run's event log with its reason.
A client that refuses for budget is not asked again in this run.

With ``federation.encryption: ckks`` GRPO rewards go through :meth:`Channel.mixture`: clients
send ciphertexts, the server mixes them with its public CKKS context and a rotating decryptor
client opens only the aggregate. The router fit (phase 2) always uses :meth:`Channel.score`:
per-client noised scores in the clear, recorded in each client's ledger like every release.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from collections.abc import Callable, Sequence

import numpy as np
import tenseal as ts
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from PIL import Image

from mor_secure.alignment.grpo import MixtureReward, completion_text
from mor_secure.crypto import ckks
from mor_secure.errors import ConfigError, CryptoError, ProtocolError
from mor_secure.federation import hops
from mor_secure.federation import protocol as P
from mor_secure.rewards.router import Router

if TYPE_CHECKING:
    from mor_secure.deploy.supernode import Rhythm

log = logging.getLogger(__name__)

# weights_fn(present (N, K) bool) -> effective per-slot weights (N, K): router weight x scale a_k
WeightsFn = Callable[[np.ndarray], np.ndarray]


#: Seconds between the ServerApp's pulls for replies from a Flower ``Grid``: an eighth of the time
#: since the messages were pushed (``POLL_FRACTION``), at least ``POLL_S[0]`` and at most
#: ``POLL_S[1]``, so a reply that takes t seconds is seen at most about t/8 later. Flower's own
#: ``Grid.send_and_receive`` waits 3 s between pulls on a SuperLink (``HttpGrid``), which
#: added 1.5 s on average to every reward round trip in deployment.
POLL_S = (0.02, 0.25)
POLL_FRACTION = 0.125
#: The replies' round trips of each message type, learnt (``deploy.supernode.Rhythm``): once
#: they repeat, the ServerApp sleeps through most of the next one before it pulls.
_REPLY_RHYTHMS: dict[str, Rhythm] = {}


def _short_reply_pulls(grid) -> None:
    """A SuperLink's ``HttpGrid`` pulls each reply's objects with Flower's object pull, whose first
    retry of an object not yet pushed waits 1 s; a reply's objects follow the reply by
    milliseconds. Make that retry wait 0.02 s, doubling up to 0.05 s, at most 6000 tries
    (``deploy.supernode.short_pull_backoff``)."""
    from flwr.superlink.grid import http_grid

    from mor_secure.deploy.supernode import short_pull_backoff

    if isinstance(grid, http_grid.HttpGrid) and not short_pull_backoff(http_grid):
        log.warning("flwr.superlink.grid.http_grid has no Flower pull_objects; reply pulls keep Flower's backoff")


def send_and_receive(grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies until all came back or ``timeout`` passed.

    A Flower ``Grid`` on a SuperLink is polled with ``POLL_S``. Other grids are asked through
    their own ``send_and_receive``: the simulation's ``InMemoryGrid`` already pulls every 0.1 s
    from memory, ``InProcessGrid`` delivers synchronously, and test doubles record what they see.
    """
    if not messages:
        return []
    if not isinstance(grid, Grid) or isinstance(grid, InMemoryGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    _short_reply_pulls(grid)
    from mor_secure.deploy.supernode import Rhythm

    kind = messages[0].metadata.message_type
    rhythm = _REPLY_RHYTHMS.setdefault(kind, Rhythm(floor_s=POLL_S[0], ceiling_s=POLL_S[1], fraction=POLL_FRACTION))
    hops.note(hops.SERVER_PUSH, kind=kind)
    pending = set(grid.push_messages(messages))
    hops.note(hops.SERVER_PUSHED)
    start = time.monotonic()
    deadline = start + timeout
    replies: list[Message] = []
    rhythm.restart()
    lead = rhythm.lead(0.0)
    if lead > 0:
        time.sleep(min(lead, timeout))
    while pending:
        hops.note(hops.SERVER_PULL)
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        now = time.monotonic()
        if not pending:
            hops.note(hops.SERVER_DONE)
            rhythm.observe(now - start)
            break
        if now >= deadline:
            break
        time.sleep(min(rhythm.wait(now - start), deadline - now))
    return replies


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
    ckks_public: ts.Context | None = None  # public-only; set by use_ckks when encryption is on
    ckks_capacity: float = 0.0  # largest |mixture| the CKKS parameters hold (ckks.aggregate_capacity)
    decryptions: int = 0  # aggregates decrypted so far (drives the decryptor rotation)
    ciphertext_bytes: int = 0  # ciphertext bytes received from clients and aggregates sent out
    # silent clients: consecutive timeouts, and requests still to skip before asking again
    misses: dict[str, int] = field(default_factory=dict)
    skip: dict[str, int] = field(default_factory=dict)

    #: A client that timed out is skipped for the next 1, 2, 4, ... requests (at most this many),
    #: so a silent SuperNode costs ``timeout_s`` a handful of times per run instead of on every
    #: GRPO step; one answer resets it.
    MAX_SKIP = 64

    def note(self, kind: str, **detail) -> None:
        """Append one line to the run's event log (refusals, rejections, dropouts)."""
        row = {"time": time.time(), "kind": kind, **detail}
        with open(self.events_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.warning("%s: %s", kind, detail)

    # -- phase 1 -----------------------------------------------------------------------------------
    def wait_for_nodes(self, expected: int, timeout_s: float) -> list[int]:
        """The grid's node ids once it lists ``expected`` of them, or whatever it lists after
        ``timeout_s`` (noted as ``nodes_missing``).

        Flower's ``run_simulation`` starts the ServerApp before it registers the SuperNodes, and
        on the deployment runtime SuperNodes join when they start: asking at once can leave
        clients out of the whole run.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= expected:
                return node_ids
            if time.monotonic() >= deadline:
                self.note("nodes_missing", expected=expected, present=len(node_ids),
                          reason=f"only {len(node_ids)} of {expected} SuperNodes connected within {timeout_s:.0f}s; "
                                 f"the run goes on without the others")
                return node_ids
            time.sleep(0.1)

    def train_all(self, timeout_s: float, expected: int | None = None,
                  wait_s: float | None = None) -> dict[str, ClientInfo]:
        """Phase 1: every node trains its RM (or reports the one on its disk) and says hello.
        With ``expected``, first wait up to ``wait_s`` (default ``timeout_s``) for that many nodes."""
        if expected is not None:
            node_ids = self.wait_for_nodes(expected, timeout_s if wait_s is None else wait_s)
        else:
            node_ids = sorted(self.grid.get_node_ids())
        content = RecordDict({"cfg": ConfigRecord({"run_id": self.run_id})})
        msgs = [Message(content=content, message_type="train", dst_node_id=n) for n in node_ids]
        for reply in send_and_receive(self.grid, msgs, timeout_s):
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
    def _ask(self, req: P.ScoreRequest) -> dict[str, RecordDict]:
        """Send ``req`` to every client not exhausted; the contents of the replies that came back
        without error from the node they claim, by client name. Everything else is noted."""
        content = P.encode_score_request(req)
        targets = []
        for n in self.order:
            if n in self.exhausted or n not in self.clients:
                continue
            if self.skip.get(n, 0) > 0:
                self.skip[n] -= 1
                self.note("skipped", client=n, phase=req.phase,
                          reason=f"no reply to an earlier request; asked again in {self.skip[n] + 1} request(s)")
                continue
            targets.append(n)
        msgs = [Message(content=content, message_type="query.score", dst_node_id=self.clients[n].node_id)
                for n in targets]
        self.bytes_sent += len(targets) * (req.images.nbytes + sum(len(r) for r in req.responses))
        by_node = {self.clients[name].node_id: name for name in targets}
        replies = send_and_receive(self.grid, msgs, self.timeout_s)
        answered, good = set(), {}
        for reply in replies:
            name = by_node.get(reply.metadata.src_node_id)
            if name is None:
                continue
            answered.add(name)
            if reply.has_error():
                kind = "budget_refused" if reply.error.code == P.ERR_BUDGET_REFUSED else "client_error"
                if kind == "budget_refused":
                    self.exhausted.add(name)
                self.note(kind, client=name, phase=req.phase, code=reply.error.code, reason=reply.error.reason)
                continue
            try:
                if P.client_name(reply.content) != name:
                    raise ProtocolError("reply names a different client than the node it came from")
            except ProtocolError as exc:
                self.note("rejected", client=name, phase=req.phase, reason=str(exc))
                continue
            good[name] = reply.content
        for name in answered:
            self.misses.pop(name, None)
        for name in sorted(set(targets) - answered):
            self.misses[name] = self.misses.get(name, 0) + 1
            self.skip[name] = min(2 ** (self.misses[name] - 1), self.MAX_SKIP)
            self.note("dropped", client=name, phase=req.phase,
                      reason=f"no reply within {self.timeout_s}s; skipped for the next {self.skip[name]} request(s)")
        return good

    def score(self, images: list[Image.Image], questions: list[str], responses: list[str],
              image_index: np.ndarray, *, phase: str, purpose: str) -> tuple[np.ndarray, np.ndarray]:
        """Plaintext (noised) scores (N, K) and the mask of clients present (N, K), K = ``self.order``.

        Used for the router fit (phase 2) in every mode, and for GRPO when encryption is off.
        """
        req = P.ScoreRequest(P.images_to_array(images), list(questions), list(responses), image_index,
                             run_id=self.run_id, phase=phase, purpose=purpose)
        n, k = len(responses), len(self.order)
        scores, present = np.zeros((n, k)), np.zeros((n, k), dtype=bool)
        for name, content in self._ask(req).items():
            col = self.order.index(name)
            info = self.clients[name].hello
            try:
                scores[:, col] = P.decode_scores(content, expected=n,
                                                 limit=P.score_limit(info.clip_bound, info.noise_std))
                present[:, col] = True
            except ProtocolError as exc:
                self.note("rejected", client=name, phase=phase, reason=str(exc))
        return scores, present

    # -- CKKS aggregation (DESIGN.md §4) --------------------------------------------------------------
    def use_ckks(self, public_ctx: ts.Context) -> None:
        """Turn on encrypted mixing with the server kit's PUBLIC context (CryptoError if private)."""
        if not isinstance(public_ctx, ts.Context) or public_ctx.is_private() or public_ctx.has_secret_key():
            raise CryptoError("the server's CKKS context must be public-only (server kit ckks_public.bin); "
                              "re-run `mor-secure provision` and give the server its server kit")
        self.ckks_public = public_ctx
        self.ckks_capacity = ckks.aggregate_capacity(public_ctx)
        self.audit_keys()

    def mixture(self, images: list[Image.Image], questions: list[str], responses: list[str],
                image_index: np.ndarray, weights_fn: WeightsFn, *, phase: str,
                purpose: str) -> tuple[np.ndarray, np.ndarray]:
        """The mixture reward (N,) and the clients present (N, K), with every score encrypted.

        Each client returns one ciphertext of its clipped, noised scores; the server checks each
        (a bad one excludes that client, noted), forms ``Σ_k W[:, k] ⊙ Enc(s_k)`` with its public
        context and ``W = weights_fn(present)`` (router weights × calibration scale, (N, K)), and a
        rotating decryptor client opens only that aggregate. The server never holds one client's
        scores in the clear. A client whose declared score range, times its weight, would carry the
        sum past what the CKKS parameters hold is left out (noted) rather than let the sum wrap.
        With no usable ciphertext, or no decryptor answering, the reward is 0 and no client counts
        as present (noted). More responses than one ciphertext holds: CryptoError, before any
        client is asked (nothing is released).
        """
        if self.ckks_public is None:
            raise CryptoError("CKKS mixing needs the server's public context: call use_ckks first")
        n, k = len(responses), len(self.order)
        slots = ckks.slot_count(self.ckks_public)
        if n > slots:
            raise CryptoError(f"{n} responses in one request but one CKKS ciphertext holds {slots}: lower "
                              "grpo.prompts_per_step x grpo.num_generations, or provision larger CKKS parameters")
        req = P.ScoreRequest(P.images_to_array(images), list(questions), list(responses), image_index,
                             run_id=self.run_id, phase=phase, purpose=purpose, encrypt=True)
        cts = self._ciphertexts(self._ask(req), n, phase)
        present, weights, limit = self._within_capacity(cts, weights_fn, n, phase)
        if not cts:
            self.note("no_scores", phase=phase, reason="no client returned a usable ciphertext")
            return np.zeros(n), present
        names = [x for x in self.order if x in cts]
        cols = [self.order.index(x) for x in names]
        aggregate = ckks.weighted_sum(self.ckks_public, [cts[x][0] for x in names], [weights[:, c] for c in cols])
        self.ciphertext_bytes += sum(cts[x][1] for x in names) + len(aggregate)
        reward = self._decrypt(aggregate, n, limit + 1e-3, names, phase)
        if reward is None:
            return np.zeros(n), np.zeros((n, k), dtype=bool)
        return reward, present

    def audit_keys(self) -> None:
        """Record in ``key_audit.json`` the TenSEAL contexts this (server) process holds now that
        encrypted mixing is on (see ``ckks.context_census``; a walk of every live object, so it
        runs once, here, not per step)."""
        path = self.events_path.parent / "key_audit.json"
        audit = json.loads(path.read_text()) if path.exists() else {"process": "server"}
        audit["encrypted_mixing_on"] = ckks.context_census()
        path.write_text(json.dumps(audit, indent=2))

    def _limit(self, name: str) -> float:
        info = self.clients[name].hello
        return P.score_limit(info.clip_bound, info.noise_std)

    def _within_capacity(self, cts: dict, weights_fn: WeightsFn, n: int,
                         phase: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The clients present (N, K), their weights ``weights_fn(present)`` (N, K) and the largest
        |mixture| per slot their declared score ranges allow (N,), for the clients in ``cts``.
        While that largest |mixture| reaches ``ckks_capacity``, the client reaching furthest is
        dropped from ``cts`` (noted) and the weights renormalised without it."""
        while True:
            present = np.zeros((n, len(self.order)), dtype=bool)
            for name in cts:
                present[:, self.order.index(name)] = True
            if not cts:
                return present, None, None
            weights = np.asarray(weights_fn(present), dtype=np.float64)  # (N, K)
            reach = {x: np.abs(weights[:, self.order.index(x)]) * self._limit(x) for x in cts}
            limit = sum(reach.values())
            if limit.max() < self.ckks_capacity:
                return present, weights, limit
            worst = max(reach, key=lambda x: reach[x].max())
            self.note("rejected", client=worst, phase=phase,
                      reason=f"declared score range x weight reaches {reach[worst].max():.3g} and the mixture "
                             f"{limit.max():.3g}; the CKKS parameters hold |mixture| < {self.ckks_capacity:g}")
            del cts[worst]

    def _ciphertexts(self, contents: dict[str, RecordDict], n: int,
                     phase: str) -> dict[str, tuple[ts.CKKSVector, int]]:
        """The well-formed ciphertexts of ``n`` slots (loaded, with their size in bytes), by client;
        the others are noted and dropped."""
        good = {}
        for name, content in contents.items():
            try:
                data = P.decode_encrypted_scores(content, max_bytes=ckks.MAX_CIPHERTEXT_BYTES)
                good[name] = (ckks.check_ciphertext(self.ckks_public, data, n, who=f"client {name}"), len(data))
            except ProtocolError as exc:
                self.note("rejected", client=name, phase=phase, reason=str(exc))
        return good

    def _decrypt(self, aggregate: bytes, n: int, limit: np.ndarray, candidates: list[str],
                 phase: str) -> np.ndarray | None:
        """Ask the decryptors in rotation (one per call, the next on failure; at most one try each)."""
        start = self.decryptions % len(candidates)
        self.decryptions += 1
        content = P.encode_decrypt_request(self.run_id, phase, aggregate, n)
        for name in candidates[start:] + candidates[:start]:
            node = self.clients[name].node_id
            msg = Message(content=content, message_type="query.decrypt", dst_node_id=node)
            replies = send_and_receive(self.grid, [msg], self.timeout_s)
            reply = next((r for r in replies if r.metadata.src_node_id == node), None)
            if reply is None:
                self.note("decrypt_failed", client=name, phase=phase, reason=f"no reply within {self.timeout_s}s")
            elif reply.has_error():
                self.note("decrypt_failed", client=name, phase=phase, code=reply.error.code, reason=reply.error.reason)
            else:
                try:
                    return P.decode_aggregate(reply.content, expected=n, limit=limit)
                except ProtocolError as exc:
                    self.note("decrypt_failed", client=name, phase=phase, reason=str(exc))
        self.note("no_scores", phase=phase, reason="no decryptor returned the aggregate")
        return None


def server_public_context(record: dict) -> ts.Context:
    """The public CKKS context of the server kit named in the run record (``server_kit``)."""
    from mor_secure.crypto.provision import load_server_kit

    path = record.get("server_kit")
    if not path:
        raise ConfigError("federation.encryption is ckks but the run names no server kit: pass "
                          "--run-config \"server-kit='/abs/kits/server'\" to flwr run (see README 'Across machines')")
    return load_server_kit(Path(path)).ckks_context


class EncryptedMixtureReward(MixtureReward):
    """The GRPO reward with CKKS on: the channel returns the decrypted mixture directly.

    Same reward as :class:`MixtureReward` (``Σ_k w_k(x) a_k s_k``), but the router's weights are
    applied to ciphertexts by the server and only the aggregate is decrypted (by a client).
    """

    def __init__(self, channel: Channel, router: Router, features: torch.Tensor,
                 images: Sequence[Image.Image], questions: Sequence[str]) -> None:
        super().__init__(channel.score, router, features, images, questions)
        self.channel = channel

    def __call__(self, prompts, completions, idx, **_: object) -> list[float]:
        idx = np.asarray(idx, dtype=np.int64)
        unique, inverse = np.unique(idx, return_inverse=True)
        feats = self.features[idx]

        def weights(present: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                w = self.router.weights(feats, torch.as_tensor(present)) * self.router.scale
            return w.numpy()

        reward, present = self.channel.mixture(
            [self.images[i] for i in unique], [self.questions[i] for i in unique],
            [completion_text(c) for c in completions], inverse.astype(np.int64), weights,
            phase="grpo", purpose="score policy samples (CKKS)")
        self.log.steps.append({"reward_mean": float(reward.mean()), "clients_present": present.any(0).tolist()})
        return reward.tolist()
