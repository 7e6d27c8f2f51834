"""The MoR ClientApp: Flower handlers around ``ClientNode``.

Which client folder a node serves: ``node_config["client-dir"]`` in deployment (each
SuperNode is started with its own folder, prepared by ``mor-secure client init``), else in
simulation the run folder's ``clients.json`` entry at ``partition-id``. The run folder comes
from the factory argument (``mor-secure run``) or ``run_config["run-dir"]`` (``flwr run .``).

Which kit (CKKS secret context): ``node_config["kit-dir"]`` in deployment, else in simulation
``<run>/kits/clients/<name>`` when the run provisioned kits (``federation.encryption: ckks``).

Where the handlers run: in this process, unless the node config names ``scorer-socket`` (a
client's long-lived ``mor-secure client serve``, ``scoring_service``). Then this process only
relays the request there, so the deployment runtime's per-message process imports Flower and
this module, not torch. Either way every request goes through :func:`handle`, and every failure
becomes a typed error reply through :func:`failure`. Heavy imports (torch, the client node) are
deferred to the in-process path for that reason.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mor_secure.errors import BudgetExceededError, ConfigError, CryptoError, ProtocolError
from mor_secure.federation import protocol as P
from mor_secure.federation import scoring_service

log = logging.getLogger(__name__)
_NODES: dict = {}  # (client folder, kit) -> ClientNode, one per pair in this process
_NODES_LOCK = threading.Lock()
_PREPARED = threading.Event()  # torch threads set and libraries quieted in this process (once)


def _prepare_once() -> None:
    # A module-level function: the handlers below are pickled by value for Ray's simulation actors,
    # and an Event they referenced directly would be pickled with them (and fail: it holds a lock).
    if not _PREPARED.is_set():
        import torch

        from mor_secure.quiet import quiet_libraries

        torch.set_num_threads(1)  # simulation runs several clients on few cores
        quiet_libraries()
        _PREPARED.set()


def resolve_client_dir(context: Context, run_dir: Path | None) -> Path:
    node_config = context.node_config
    if "client-dir" in node_config:
        return Path(str(node_config["client-dir"])).resolve()
    run_dir = run_dir or (Path(str(context.run_config["run-dir"])) if context.run_config.get("run-dir") else None)
    if run_dir is None:
        raise ConfigError("this SuperNode has no client folder: start it with --node-config 'client-dir=\"PATH\"'")
    names = json.loads((run_dir / "clients.json").read_text())
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(names):
        raise ConfigError(f"partition-id {pid} has no client; the run has {len(names)} clients")
    return (run_dir / "clients" / names[pid]).resolve()


def resolve_kit_dir(context: Context, client_dir: Path) -> Path | None:
    """The client's kit: node_config 'kit-dir', else the simulation run's own kit, else None."""
    if "kit-dir" in context.node_config:
        return Path(str(context.node_config["kit-dir"])).resolve()
    sim_kit = client_dir.parent.parent / "kits" / "clients" / client_dir.name
    return sim_kit if (client_dir.parent.parent / "clients.json").is_file() and sim_kit.is_dir() else None


def node_for(context: Context, run_dir: Path | None):
    from mor_secure.federation.client_node import ClientNode

    folder = resolve_client_dir(context, run_dir)
    key = (folder, resolve_kit_dir(context, folder))
    with _NODES_LOCK:
        if key not in _NODES:
            _NODES[key] = ClientNode(*key)
        return _NODES[key]


def handle(kind: str, content: RecordDict, node) -> RecordDict:
    """The reply content for one request to ``node`` (a ``ClientNode``); raises typed errors."""
    if kind == "train":
        run_id = content["cfg"]["run_id"] if "cfg" in content.config_records else None
        if not isinstance(run_id, str) or not run_id:
            raise ProtocolError("cfg.run_id must be a non-empty string")
        model_class = node.train(run_id, progress=False)
        s = node.config.scores
        return P.encode_hello(node.name, model_class, s.clip_bound, s.noise_std, node.config.privacy.dp_sgd)
    if kind == "query.score":
        from mor_secure.crypto import ckks

        req = P.decode_score_request(content)
        if req.encrypt:  # no kit, or more responses than slots: refuse before anything is recorded
            slots = ckks.slot_count(node.ckks_context)
            if len(req.responses) > slots:
                raise ProtocolError(f"cfg.responses has {len(req.responses)} items; one ciphertext holds {slots}")
            return P.encode_encrypted_scores(node.name, node.encrypt(node.score(req)))
        return P.encode_scores(node.name, node.score(req))
    if kind == "query.decrypt":
        return P.encode_aggregate(node.name, node.decrypt(P.decode_decrypt_request(content)))
    raise ProtocolError(f"unknown message type {kind!r}; this client answers train, query.score, query.decrypt")


def failure(exc: BaseException) -> tuple[int, str]:
    """The error code and reason a client replies with for ``exc``."""
    if isinstance(exc, BudgetExceededError):
        return P.ERR_BUDGET_REFUSED, str(exc)
    if isinstance(exc, ProtocolError):
        return P.ERR_BAD_REQUEST, str(exc)
    if isinstance(exc, (ConfigError, CryptoError)):
        return P.ERR_NOT_READY, str(exc)
    # reported to the server, with the trace in the client log
    log.error("client handler failed:\n%s", "".join(traceback.format_exception(exc)))
    return P.ERR_INTERNAL, f"{type(exc).__name__}: {exc}"


def serve_message(msg: Message, context: Context, run_dir: Path | None) -> Message:
    """Every failure becomes a typed error reply; the node is never crashed silently."""
    socket_path = context.node_config.get("scorer-socket")
    if socket_path:
        try:
            out = scoring_service.forward(Path(str(socket_path)), msg.metadata.message_type, msg.content,
                                          dict(context.node_config))
        except scoring_service.ServiceError as exc:
            return P.error_reply(msg, P.ERR_NOT_READY, str(exc))
        return P.error_reply(msg, *out) if isinstance(out, tuple) else Message(out, reply_to=msg)
    _prepare_once()
    try:
        return Message(handle(msg.metadata.message_type, msg.content, node_for(context, run_dir)), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - typed by failure()
        return P.error_reply(msg, *failure(exc))


def make_client_app(run_dir: Path | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return serve_message(msg, context, run_dir)

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        return serve_message(msg, context, run_dir)

    @app.query("decrypt")
    def decrypt(msg: Message, context: Context) -> Message:
        return serve_message(msg, context, run_dir)

    return app


app = make_client_app()
