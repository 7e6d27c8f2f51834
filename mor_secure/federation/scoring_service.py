"""A client's long-lived scoring service, and the relay a ClientApp uses to reach it.

Why: Flower 1.42's deployment runtime starts a fresh ``flwr-clientapp`` process for every
message. Importing the full ClientApp (torch, transformers, TenSEAL) and loading the reward
model costs that process about 7 s, on every GRPO step (BENCHMARKS.md, ``bench perf`` (b)).
With a service, the client's ``ClientNode`` stays loaded in one process on the client's host:
``mor-secure client serve --dir D [--kit K]``. The SuperNode gets ``scorer-socket="PATH"`` in
its node config, and then each per-message ClientApp process only imports Flower and this
module. It passes the request to the service over a Unix socket and returns its reply.

The service runs exactly the handlers the in-process ClientApp runs
(``client_app.handle``). The same checks, clipping, noise, budget refusals and ledger writes
happen, in one process instead of many. Nothing in the privacy model changes: the service
releases only what the ClientApp would have released, and only to the ClientApp's process.

Local trust boundary (threat T25 in threat_model.md):

* The socket is created owner-only (mode 0600) and lives in the client's own folder (0700).
* The service refuses a peer whose uid is not its own (``SO_PEERCRED``).
* It serves exactly one client folder: a request whose node config names another folder is
  refused with an error that names both folders.
* Frames are bounded (``MAX_HEADER``, ``MAX_BODY``), and a malformed frame gets an error reply.
* Requests are handled one at a time, in order.

Frame: 4-byte big-endian header length, a JSON header, 8-byte body length, then the body: a
Flower ``RecordDict`` serialized with Flower's own protobuf serde.

This module imports nothing heavy at the top: the relay side runs in every per-message process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
from pathlib import Path

from flwr.app import RecordDict

log = logging.getLogger(__name__)

SOCKET_NAME = "scorer.sock"
EXECUTOR_SECRET = "superexec_auth.secret"  # written by `mor-secure client init` (deploy.client_init)
MAX_HEADER = 64 * 1024
MAX_BODY = 256 * 2**20
#: How long a relay waits for the service's reply. Training an RM takes minutes; scoring,
#: decrypting and hello take seconds. Past the limit the relay replies with an error instead.
REPLY_TIMEOUT_S = {"train": 6 * 3600.0}
DEFAULT_REPLY_TIMEOUT_S = 600.0


class ServiceError(Exception):
    """The relay could not get a reply from the service (not running, refused, broken frame)."""


# -- framing ---------------------------------------------------------------------------------------
def _to_bytes(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def _from_bytes(body: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

    return recorddict_from_proto(ProtoRecordDict.FromString(body))


def send_frame(sock: socket.socket, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    if len(head) > MAX_HEADER or len(body) > MAX_BODY:
        raise ValueError(f"frame too large: header {len(head)} B (max {MAX_HEADER}), body {len(body)} B "
                         f"(max {MAX_BODY})")
    sock.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(body)) + body)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes]:
    """One frame. ValueError names what is wrong: an oversized length, or a header that is not a
    JSON object. Nothing past a length that is too large is read."""
    (n_head,) = struct.unpack(">I", _read_exactly(sock, 4))
    if n_head > MAX_HEADER:
        raise ValueError(f"frame header of {n_head} B exceeds {MAX_HEADER} B")
    try:
        header = json.loads(_read_exactly(sock, n_head))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"frame header must be a JSON object; found {type(header).__name__}")
    (n_body,) = struct.unpack(">Q", _read_exactly(sock, 8))
    if n_body > MAX_BODY:
        raise ValueError(f"frame body of {n_body} B exceeds {MAX_BODY} B")
    return header, _read_exactly(sock, n_body)


# -- relay (runs in each per-message ClientApp process) --------------------------------------------
def forward(path: Path, kind: str, content: RecordDict, node_config: dict) -> RecordDict | tuple[int, str]:
    """Ask the service at ``path`` to handle one request. Returns the reply content, or the
    ``(code, reason)`` of the error reply the service chose. ServiceError if no reply came."""
    timeout = REPLY_TIMEOUT_S.get(kind, DEFAULT_REPLY_TIMEOUT_S)
    config = {k: str(v) for k, v in node_config.items()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            try:
                send_frame(sock, {"kind": kind, "node_config": config}, _to_bytes(content))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the service refused before reading it all; its reply says why (read below)
            header, body = recv_frame(sock)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ServiceError(f"no scoring service listens on {path} ({exc.strerror}); start it on this host with "
                           f"`mor-secure client serve --dir CLIENT_FOLDER`, or remove scorer-socket from the "
                           f"SuperNode's --node-config to score in the ClientApp itself") from None
    except socket.timeout:
        raise ServiceError(f"the scoring service at {path} gave no reply to {kind!r} within {timeout:.0f}s") from None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"the exchange with the scoring service at {path} failed: {exc}") from None
    if header.get("ok") is True:
        try:
            return _from_bytes(body)
        except Exception as exc:  # noqa: BLE001 - a broken body is the service's fault; say so
            raise ServiceError(f"the scoring service at {path} sent a reply that is not a RecordDict: {exc}") from None
    code, reason = header.get("code"), header.get("reason")
    if not isinstance(code, int) or not isinstance(reason, str):
        raise ServiceError(f"the scoring service at {path} sent a reply with neither ok nor an error code: {header}")
    return code, reason


# -- service ---------------------------------------------------------------------------------------
def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ScoringService:
    """One client folder's ``ClientNode``, served on a Unix socket until ``stop`` (or SIGTERM)."""

    def __init__(self, folder: Path, kit_dir: Path | None = None, socket_path: Path | None = None) -> None:
        from mor_secure.federation.client_node import ClientNode

        self.folder = Path(folder).resolve()
        self.kit_dir = Path(kit_dir).resolve() if kit_dir is not None else None
        self.node = ClientNode(self.folder, self.kit_dir)  # ConfigError here if the folder is not a client's
        self.path = Path(socket_path).resolve() if socket_path is not None else self.folder / SOCKET_NAME
        self.handled = 0
        self._sock: socket.socket | None = None
        self._stopping = False

    def bind(self) -> "ScoringService":
        """Create the owner-only socket. ConfigError if another service already listens on it."""
        from mor_secure.errors import ConfigError

        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale socket left by a service that died
            else:
                raise ConfigError(f"a scoring service already listens on {self.path}; stop it first or pass "
                                  f"another --socket")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)  # accept() wakes up twice a second to see whether to stop
        self._sock = sock
        return self

    def stop(self) -> None:
        self._stopping = True

    def serve(self, max_requests: int | None = None) -> None:
        """Handle requests one at a time until ``stop``, SIGTERM/SIGINT, or ``max_requests``."""
        if self._sock is None:
            self.bind()
        try:
            while not self._stopping and (max_requests is None or self.handled < max_requests):
                try:
                    conn, _ = self._sock.accept()
                except socket.timeout:
                    continue
                with conn:
                    self._handle(conn)
        finally:
            self._sock.close()
            self.path.unlink(missing_ok=True)

    def _handle(self, conn: socket.socket) -> None:
        from mor_secure.federation import protocol as P

        conn.settimeout(60.0)  # for reading the request; the reply is written as soon as it exists
        uid = peer_uid(conn)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (this service runs as uid %d)", uid, os.getuid())
            _refuse(conn, P.ERR_BAD_REQUEST, f"peer uid {uid} is not this service's uid {os.getuid()}")
            return
        try:
            header, body = recv_frame(conn)
            kind = header.get("kind")
            if not isinstance(kind, str):
                raise ValueError("frame header has no string 'kind'")
            if not isinstance(header.get("node_config", {}), dict):
                raise ValueError("frame header's node_config must be a JSON object")
            content = _from_bytes(body)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is the sender's fault
            _refuse(conn, P.ERR_BAD_REQUEST, f"malformed request frame: {exc}")
            return
        out = self.answer(kind, content, header.get("node_config", {}))
        if isinstance(out, tuple):
            _refuse(conn, *out)
        else:
            _try_send(conn, {"ok": True}, _to_bytes(out))

    def answer(self, kind: str, content: RecordDict, node_config: dict) -> RecordDict | tuple[int, str]:
        """The reply content for one request, or the ``(code, reason)`` of its error reply: the
        socket path and the Runtime API executor (``runtime_executor``) both answer here."""
        from mor_secure.federation import client_app
        from mor_secure.federation import protocol as P

        named = node_config.get("client-dir")
        if named is not None and Path(str(named)).resolve() != self.folder:
            return (P.ERR_NOT_READY, f"the SuperNode's client-dir {named} is not the folder this service "
                                     f"serves ({self.folder}); start one service per client folder")
        self.handled += 1
        try:
            return client_app.handle(kind, content, self.node)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error reply
            return client_app.failure(exc)


def _refuse(conn: socket.socket, code: int, reason: str) -> None:
    """Answer with an error frame (the relay turns it into Flower's error reply)."""
    _try_send(conn, {"ok": False, "code": code, "reason": reason})


def _try_send(conn: socket.socket, header: dict, body: bytes = b"") -> None:
    try:
        send_frame(conn, header, body)
    except OSError as exc:  # the relay gave up (timeout) or died; the ledger already has the release
        log.warning("could not send the reply to the relay: %s", exc)


def _stop_on_signals(stop) -> None:
    """Call ``stop()`` on SIGTERM or SIGINT (the serving loop then ends after its current request)."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop())
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop())


def run_service(folder: Path, kit_dir: Path | None = None, socket_path: Path | None = None,
                runtime_api: str | None = None, auth_secret_file: Path | None = None) -> int:
    """``mor-secure client serve``: serve until SIGTERM or SIGINT; 0 on a clean stop.

    With ``runtime_api`` (a SuperNode started with ``--isolation process``) the service is that
    SuperNode's ClientApp executor (``runtime_executor``) instead of listening on a socket."""
    from mor_secure.errors import ConfigError
    from mor_secure.quiet import quiet_libraries

    quiet_libraries()
    if runtime_api is None and auth_secret_file is not None:
        raise ConfigError("--superexec-auth-secret-file goes with --runtime-api (the SuperNode's Runtime API)")
    if runtime_api is not None:
        if auth_secret_file is None and (Path(folder) / EXECUTOR_SECRET).is_file():
            auth_secret_file = Path(folder) / EXECUTOR_SECRET  # written by `mor-secure client init`
        return _run_executor(ScoringService(folder, kit_dir, socket_path), runtime_api, auth_secret_file)
    service = ScoringService(folder, kit_dir, socket_path).bind()
    _stop_on_signals(service.stop)
    print(f"client {service.node.name}: scoring service on {service.path} "
          f"(SuperNode --node-config: scorer-socket=\"{service.path}\"); stop with Ctrl-C or SIGTERM", flush=True)
    service.serve()
    print(f"client {service.node.name}: scoring service stopped after {service.handled} request(s)", flush=True)
    return 0


def _run_executor(service: ScoringService, runtime_api: str, auth_secret_file: Path | None) -> int:
    from mor_secure.errors import ConfigError
    from mor_secure.federation.runtime_executor import ExecutorRefused, RuntimeExecutor

    secret = None
    if auth_secret_file is not None:
        try:
            secret = Path(auth_secret_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--superexec-auth-secret-file {auth_secret_file}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"--superexec-auth-secret-file {auth_secret_file} is empty; give the same non-empty "
                              f"file as the SuperNode's --superexec-auth-secret-file")
    executor = RuntimeExecutor(runtime_api, service.answer, auth_secret=secret)
    _stop_on_signals(executor.stop)
    print(f"client {service.node.name}: ClientApp executor for the SuperNode's Runtime API at {runtime_api} "
          f"(start the SuperNode with --isolation process); stop with Ctrl-C or SIGTERM", flush=True)
    try:
        executor.run()
    except ExecutorRefused as exc:
        raise ConfigError(str(exc)) from None
    print(f"client {service.node.name}: executor stopped after {executor.tasks} task(s), {executor.failed} failed; "
          f"scoring service stopped after {service.handled} request(s)", flush=True)
    return 0
