"""The scoring service as its SuperNode's ClientApp executor: no process per message.

Flower's deployment runtime hands each message to a task executor through the SuperNode's local
Runtime API. By default (``--isolation subprocess``) the SuperNode starts Flower's SuperExec,
which acquires each task and starts a new ``flwr-clientapp`` process for it. That process costs
about 0.7 s even as a relay to ``mor-secure client serve`` (BENCHMARKS.md, perf (b)).

With ``--isolation process`` the SuperNode starts no executor and waits for one to attach. Then
``mor-secure client serve --runtime-api HOST:PORT`` is that executor. The service already holds the
client's ``ClientNode``. It acquires each ClientApp task from the Runtime API (Flower's
``AcquireTask``, as the SuperExec does) and takes the task's token. It then does with Flower's own
functions what ``flwr-clientapp`` does: it pulls the message and context, sends task heartbeats,
pushes the reply and pushes the task's final status. In between it answers in this process,
through the same :meth:`ScoringService.answer` as the socket path.

What differs from ``flwr-clientapp``, on purpose:

* the FAB the server submitted is neither installed nor run. The client answers with its own
  installed ``mor_secure`` only, so a server cannot make a client run code of its choosing;
* tasks run one at a time, in the order acquired;
* Flower's ``--superexec-auth-secret-file`` (the same file on both sides) makes the SuperNode
  refuse ``AcquireTask`` from anyone without the secret. Without it, any local process that
  can reach the Runtime API's port can take the client's tasks (threat T25).

Flower internals used, all present in flwr 1.42: ``flwr.supercore.runtime.RuntimeHttpClient``,
the interceptors ``RuntimeVersionHttpInterceptor``, ``RuntimeTokenHttpInterceptor`` and
``SuperExecAuthHttpInterceptor``, ``flwr.supercore.heartbeat``, ``push_message`` and
``push_task_output`` from ``flwr.supernode.runtime.run_clientapp``, and the pieces of its
``pull_task_input`` (see :func:`pull_task_input` here for the two differences).
``tests/test_runtime_executor.py`` runs them against a real SuperNode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import httpx
from flwr.app import Message

from mor_secure.federation import hops

log = logging.getLogger(__name__)

#: AcquireTask is the only Runtime API call Flower protects with the SuperExec secret.
_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


#: After a failed AcquireTask (the SuperNode restarting, say), wait this long before the next.
RETRY_S = 1.0


class ExecutorRefused(Exception):
    """The SuperNode's Runtime API refused this executor (401/403): wrong or missing secret."""


def _runtime_client(address: str, interceptors: list):
    """A Runtime API client without Flower's retry invoker: on a 401 that invoker sends SIGINT to
    its own process (right for a Flower process, wrong for a service), so errors come back here."""
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=None)


def pull_task_input(client):
    """The task's message and context: Flower's ``run_clientapp.pull_task_input`` with two changes.
    The FAB is not inflated (it is never run), and a message object not yet in the SuperNode's store
    is pulled again after 0.02 s, not 1 s, and at most every 0.05 s, not 10 s (``PULL_RETRY``).
    The SuperNode hands out the task as soon as it has stored the message, and its objects follow
    a moment later."""
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    from mor_secure.deploy.supernode import PULL_RETRY

    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task.task_id, task.run.run_id, task.context.node_id
    context = context_from_proto(task.context)
    res = client.PullMessages(PullAppMessagesRequest())
    if not res.messages_list:
        raise RuntimeError("the SuperNode's Runtime API returned no message for this task")
    node, tree = Node(node_id=context.node_id), res.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, **PULL_RETRY)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the deflated message lacks it
    return message, context


class RuntimeExecutor:
    """Acquire ClientApp tasks from a SuperNode's Runtime API at ``address`` and answer each
    with ``answer(kind, content, node_config)``. That callable returns a ``RecordDict`` or an
    error ``(code, reason)``, as ``ScoringService.answer`` does.

    Between tasks it polls on ``deploy.supernode.Rhythm``'s schedule: every 0.02 s right after a
    task, up to every 3 s once idle; once tasks come regularly, most of the gap is one sleep."""

    def __init__(self, address: str, answer: Callable, *, auth_secret: bytes | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

        self.address, self._answer = address, answer
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret is not None:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret,
                                                             protected_methods=_AUTH_METHODS))
        self._client = _runtime_client(address, interceptors)
        self.tasks = 0
        self.failed = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def acquire(self) -> str | None:
        """One ``AcquireTask``: the token of a ClientApp task, or None if there is none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType

        try:
            res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (401, 403):
                raise ExecutorRefused(
                    f"the SuperNode's Runtime API at {self.address} refused AcquireTask "
                    f"({exc.response.status_code}): give `client serve` the same --superexec-auth-secret-file as "
                    f"the SuperNode (default: the client folder's superexec_auth.secret)") from None
            raise
        return res.token if res.HasField("task") and res.token else None

    def run(self, max_tasks: int | None = None, idle_timeout_s: float | None = None) -> None:
        """Serve tasks until ``stop()``, ``max_tasks`` tasks, or ``idle_timeout_s`` without one.
        ExecutorRefused if the SuperNode refuses this executor."""
        from mor_secure.deploy.supernode import Rhythm

        rhythm = Rhythm()
        last = time.monotonic()
        try:
            while not self._stop.is_set() and (max_tasks is None or self.tasks < max_tasks):
                lead = rhythm.lead(time.monotonic() - last)
                if lead > 0 and self._stop.wait(lead):
                    break
                try:
                    token = self.acquire()
                except (httpx.TransportError, httpx.HTTPStatusError) as exc:  # not a refusal: try again
                    log.warning("AcquireTask at %s failed (%s); trying again in %.0f s", self.address, exc, RETRY_S)
                    self._stop.wait(RETRY_S)
                    continue
                if token is not None:
                    hops.note("executor.acquired")
                    rhythm.observe(time.monotonic() - last)
                    self.run_task(token)
                    hops.note("executor.finished")
                    last = time.monotonic()
                    continue
                idle = time.monotonic() - last
                if idle_timeout_s is not None and idle > idle_timeout_s:
                    return
                self._stop.wait(rhythm.wait(idle))
        finally:
            self._client.close()

    def run_task(self, token: str) -> None:
        """What ``flwr-clientapp --token TOKEN`` does, in this process, with this client's own code."""
        from flwr.app import Error
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from mor_secure.federation import protocol as P

        self.tasks += 1
        client = _runtime_client(self.address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                                RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = None
        status, details = SubStatus.FAILED, "the task failed before its message was read"
        try:
            message, context = pull_task_input(client)  # the FAB is not pulled, installed or run
            hops.note("executor.inputs")
            out = self._answer(message.metadata.message_type, message.content, dict(context.node_config))
            hops.note("executor.answered")
            reply = P.error_reply(message, *out) if isinstance(out, tuple) else Message(out, reply_to=message)
            push_message(client, reply, context)
            hops.note("executor.replied")
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - the task fails with a reason; the service goes on
            self.failed += 1
            details = f"{type(exc).__name__}: {exc}"
            log.error("ClientApp task failed: %s", details, exc_info=exc)
            if message is not None and context is not None:
                try:
                    push_message(client, Message(Error(code=P.ERR_INTERNAL, reason=details), reply_to=message),
                                 context)
                except Exception as push_exc:  # noqa: BLE001 - nothing more can be sent on this task
                    log.error("could not push the error reply either: %s", push_exc)
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()
