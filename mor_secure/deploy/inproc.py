"""An in-process Flower ``Grid``: the ServerApp's messages go to real ClientApps in this process.

Every message and reply is deflated to Flower's wire objects and inflated back, so each side
gets its own copy (as over a network) and ``bytes_down`` / ``bytes_up`` count what a SuperLink
would carry. There is no network, TLS or polling: this isolates the protocol's own cost
(benchmarks, protocol tests); deployment tests use real SuperLink/SuperNode processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def ensure_task_identity(run_id: int = 1) -> None:
    """Outside a Flower runtime, give this process the server's task identity (Flower stamps
    it into every new ``Message``); a value already set by a runtime is kept."""
    for attr, value in (("task_id", 1), ("run_id", run_id), ("node_id", SERVER_NODE_ID)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, value)


def wire_copy(msg: Message) -> tuple[Message, int]:
    """A copy of ``msg`` rebuilt from its wire objects, and the number of bytes they hold."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    size = sum(len(c) for c in contents.values())
    copy = inflate_object_from_contents(msg.object_id, contents, keep_object_contents=False)
    copy.metadata.__dict__["_message_id"] = msg.object_id
    return copy, size


@dataclass
class InProcessGrid:
    """Duck-typed ``flwr.serverapp.Grid`` over ``{node_id: ClientApp}`` (sequential delivery).

    ``received`` keeps every reply the server got, for audits in tests.
    """

    app: ClientApp
    node_configs: dict[int, dict]
    run_id: int = 1
    bytes_down: int = 0
    bytes_up: int = 0
    received: list[Message] = field(default_factory=list)
    keep_replies: bool = False

    def __post_init__(self) -> None:
        ensure_task_identity(self.run_id)
        self._contexts = {n: Context(run_id=self.run_id, node_id=n, node_config=dict(cfg), state=RecordDict(),
                                     run_config={}) for n, cfg in self.node_configs.items()}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self._contexts:
                continue  # an unknown node never answers (the caller notes a drop)
            inbound, size = wire_copy(msg)
            self.bytes_down += size
            reply, size = wire_copy(self.app(inbound, self._contexts[node]))
            self.bytes_up += size
            if self.keep_replies:
                self.received.append(reply)
            replies.append(reply)
        return replies
