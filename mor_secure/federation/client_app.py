"""The MoR ClientApp: Flower handlers around ``ClientNode``.

Which client folder a node serves: ``node_config["client-dir"]`` in deployment (each
SuperNode is started with its own folder, prepared by ``mor-secure client init``), else in
simulation the run folder's ``clients.json`` entry at ``partition-id``. The run folder comes
from the factory argument (``mor-secure run``) or ``run_config["run-dir"]`` (``flwr run .``).

Which kit (CKKS secret context): ``node_config["kit-dir"]`` in deployment, else in simulation
``<run>/kits/clients/<name>`` when the run provisioned kits (``federation.encryption: ckks``).
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mor_secure.crypto import ckks
from mor_secure.errors import BudgetExceededError, ConfigError, CryptoError, ProtocolError
from mor_secure.federation import protocol as P
from mor_secure.federation.client_node import ClientNode
from mor_secure.quiet import quiet_libraries

log = logging.getLogger(__name__)
_NODES: dict[tuple[Path, Path | None], ClientNode] = {}  # one per (client folder, kit) in this process
_NODES_LOCK = threading.Lock()
_QUIET = threading.Event()  # libraries quieted in this process (once: it costs ~3 ms, a walk of every logger)


def _quiet_once() -> None:
    # A module-level function: the handlers below are pickled by value for Ray's simulation actors,
    # and an Event they referenced directly would be pickled with them (and fail: it holds a lock).
    if not _QUIET.is_set():
        quiet_libraries()
        _QUIET.set()


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


def node_for(context: Context, run_dir: Path | None) -> ClientNode:
    folder = resolve_client_dir(context, run_dir)
    key = (folder, resolve_kit_dir(context, folder))
    with _NODES_LOCK:
        if key not in _NODES:
            _NODES[key] = ClientNode(*key)
        return _NODES[key]


def _guarded(handler):
    """Turn every failure into a typed error reply; never crash the node silently."""

    def wrapped(msg: Message, context: Context, run_dir: Path | None) -> Message:
        torch.set_num_threads(1)  # simulation runs several clients on few cores
        _quiet_once()
        try:
            return handler(msg, node_for(context, run_dir))
        except BudgetExceededError as exc:
            return P.error_reply(msg, P.ERR_BUDGET_REFUSED, str(exc))
        except ProtocolError as exc:
            return P.error_reply(msg, P.ERR_BAD_REQUEST, str(exc))
        except (ConfigError, CryptoError) as exc:
            return P.error_reply(msg, P.ERR_NOT_READY, str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the server, with the trace in the client log
            log.error("client handler failed:\n%s", traceback.format_exc())
            return P.error_reply(msg, P.ERR_INTERNAL, f"{type(exc).__name__}: {exc}")

    return wrapped


@_guarded
def handle_train(msg: Message, node: ClientNode) -> Message:
    run_id = msg.content["cfg"]["run_id"]
    if not isinstance(run_id, str) or not run_id:
        raise ProtocolError("cfg.run_id must be a non-empty string")
    model_class = node.train(run_id, progress=False)
    s = node.config.scores
    return Message(P.encode_hello(node.name, model_class, s.clip_bound, s.noise_std, node.config.privacy.dp_sgd),
                   reply_to=msg)


@_guarded
def handle_score(msg: Message, node: ClientNode) -> Message:
    req = P.decode_score_request(msg.content)
    if req.encrypt:  # no kit, or more responses than slots: refuse before anything is recorded
        slots = ckks.slot_count(node.ckks_context)
        if len(req.responses) > slots:
            raise ProtocolError(f"cfg.responses has {len(req.responses)} items; one ciphertext holds {slots}")
        return Message(P.encode_encrypted_scores(node.name, node.encrypt(node.score(req))), reply_to=msg)
    scores = node.score(req)
    return Message(P.encode_scores(node.name, scores), reply_to=msg)


@_guarded
def handle_decrypt(msg: Message, node: ClientNode) -> Message:
    req = P.decode_decrypt_request(msg.content)
    return Message(P.encode_aggregate(node.name, node.decrypt(req)), reply_to=msg)


def make_client_app(run_dir: Path | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_dir)

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        return handle_score(msg, context, run_dir)

    @app.query("decrypt")
    def decrypt(msg: Message, context: Context) -> Message:
        return handle_decrypt(msg, context, run_dir)

    return app


app = make_client_app()
