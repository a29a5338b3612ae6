"""A scripted QMP monitor for unit tests of the QEMU flows, without a QEMU.

:class:`FakeMonitor` implements :class:`libvirt_rdm_backup.qemu.monitor.Monitor`. It
records every command (with how many descriptors came along) and answers from a
script: :meth:`FakeMonitor.on` answers a command (optionally only when a predicate
on its arguments holds, optionally only so many times) with a value, a function of
the arguments, or an exception to raise; :meth:`FakeMonitor.fail` raises a QmpError.
Commands without a scripted answer get QEMU's usual one. Guest devices and their
nodes are modelled (:meth:`FakeMonitor.plug`; ``query-block``, ``qom-set``), and block
jobs: a ``transaction`` with ``blockdev-backup`` starts a running job,
:meth:`FakeMonitor.add_job` puts one there, ``query-jobs``, ``job-cancel`` and
``job-dismiss`` act on them, and :meth:`FakeMonitor.emit_job` scripts the states a job
shows at its next polls. Other ``query-*`` commands return ``[]``, the rest ``{}``.
:meth:`FakeMonitor.note` puts a marker into the record (e.g. where a
consistency window opened), so the order of commands around it can be asserted.
"""

from __future__ import annotations

import copy
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import QmpError

Predicate = Callable[[dict[str, Any]], bool]
JOB_ACTIONS = ("blockdev-backup", "drive-backup")


@dataclass(frozen=True)
class Call:
    """One command as the code under test issued it (``#marker`` for notes)."""

    command: str
    arguments: dict[str, Any]
    files: int = 0


@dataclass
class _Rule:
    command: str
    answer: Any
    when: Predicate | None
    times: int | None


class FakeMonitor:
    """A :class:`~libvirt_rdm_backup.qemu.monitor.Monitor` answering from a script."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.jobs: dict[str, dict[str, Any]] = {}  # job id -> its query-jobs entry
        self.devices: dict[str, str] = {}  # guest device (qdev path) -> its block node
        self._rules: list[_Rule] = []
        self._job_states: dict[str, deque[dict[str, Any]]] = {}

    # scripting

    def on(self, command: str, answer: Any = None, *, when: Predicate | None = None,
           times: int | None = None) -> None:
        """Answer ``command`` with ``answer``: a value (returned as a copy), a callable of
        the arguments, or an exception (raised). Later rules win over earlier ones."""
        self._rules.insert(0, _Rule(command, answer, when, times))

    def fail(self, command: str, desc: str = "scripted failure",
             error_class: str = "GenericError", *, when: Predicate | None = None,
             times: int | None = None) -> None:
        """Make ``command`` fail as QEMU does: a QmpError."""
        self.on(command, QmpError(command, error_class, desc), when=when, times=times)

    def emit_job(self, job: str, *states: dict[str, Any] | str) -> None:
        """The states job ``job`` shows at its ``query-jobs`` polls once it exists, one per
        poll (a status string, or fields to update); the last one stays. ``job`` is a job
        id, or a name without its token (``rdmb-job-vdb`` for ``rdmb-job-vdb-1a2b3c``)."""
        queue = self._job_states.setdefault(job, deque())
        for state in states:
            queue.append({"status": state} if isinstance(state, str) else dict(state))

    def plug(self, alias: str, node: str) -> str:
        """A virtio guest disk ``alias`` on block node ``node`` (shown by ``query-block``,
        moved by ``qom-set`` of its ``drive``); returns its qdev path."""
        qdev = f"/machine/peripheral/{alias}/virtio-backend"
        self.devices[qdev] = node
        return qdev

    def add_job(self, job_id: str, **fields: Any) -> None:
        """A job that is already there (e.g. left by another run); ``fields`` as QEMU's."""
        self.jobs[job_id] = {**_job(job_id), **{k.replace("_", "-"): v
                                                 for k, v in fields.items()}}

    def note(self, marker: str) -> None:
        """Record ``#marker`` in the order of commands."""
        self.calls.append(Call(f"#{marker}", {}))

    # reading the record

    def commands(self, skip_queries: bool = False) -> list[str]:
        """Commands in the order issued (with notes), ``query-*`` left out if asked."""
        return [c.command for c in self.calls
                if not (skip_queries and c.command.startswith("query-"))]

    def arguments(self, command: str) -> list[dict[str, Any]]:
        """The arguments of every ``command`` issued, in order."""
        return [c.arguments for c in self.calls if c.command == command]

    def steps(self) -> list[str]:
        """The record without queries, each command in short (names without their token):
        ``blockdev-add qcow2 rdmb-fleece``, ``qom-set drive=rdmb-cbw``,
        ``transaction block-dirty-bitmap-add libvirt-1-format + blockdev-backup none ...``."""
        return [_step(c) for c in self.calls if not c.command.startswith("query-")]

    # the Monitor protocol

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                files: Sequence[int] = ()) -> Any:
        args = copy.deepcopy(arguments or {})
        self.calls.append(Call(command, args, len(files)))
        for rule in self._rules:
            if rule.command != command or (rule.when is not None and not rule.when(args)):
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    self._rules.remove(rule)
            if isinstance(rule.answer, BaseException):
                raise rule.answer
            if callable(rule.answer):
                return rule.answer(args)
            return copy.deepcopy(rule.answer)
        return self._default(command, args)

    def _default(self, command: str, args: dict[str, Any]) -> Any:
        if command == "transaction":
            for action in args.get("actions", []):
                if action.get("type") in JOB_ACTIONS:
                    job_id = str(action["data"]["job-id"])
                    self.jobs.setdefault(job_id, _job(job_id))
            return {}
        if command == "query-jobs":
            for job_id, job in self.jobs.items():
                queue = self._script_of(job_id)
                if queue:
                    job.update(queue[0] if len(queue) == 1 else queue.popleft())
            return copy.deepcopy(list(self.jobs.values()))
        if command == "job-cancel":
            job = self._job(command, args["id"])
            self._script_of(job["id"]).clear()
            if job["status"] not in ("concluded", "null"):
                job.update(status="concluded", error="Operation canceled")
            return {}
        if command == "job-dismiss":
            job = self._job(command, args["id"])
            if job["status"] != "concluded":
                raise QmpError(command, "GenericError",
                               f"Job '{job['id']}' in state '{job['status']}' cannot accept "
                               "command verb 'dismiss'")
            del self.jobs[job["id"]]
            return {}
        if command == "query-block":
            return [{"device": "", "qdev": qdev, "inserted": {"node-name": node, "drv": "raw"}}
                    for qdev, node in self.devices.items()]
        if command == "qom-set" and args.get("property") == "drive":
            if args["path"] not in self.devices:
                raise QmpError(command, "DeviceNotFound",
                               f"Device '{args['path']}' not found")
            self.devices[args["path"]] = str(args["value"])
            return {}
        if command.startswith("query-"):
            return []
        return {}

    def _script_of(self, job_id: str) -> deque[dict[str, Any]]:
        for key, queue in self._job_states.items():
            if job_id == key or job_id.startswith(key + "-"):
                return queue
        return deque()

    def _job(self, command: str, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise QmpError(command, "GenericError", f"Job ID '{job_id}' not found")
        return self.jobs[job_id]


def _job(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "type": "backup", "status": "running",
            "current-progress": 0, "total-progress": 100}


def short(name: Any) -> str:
    """A name of this tool without its token (``rdmb-cbw-vdb-1a2b3c``: ``rdmb-cbw``)."""
    match = re.fullmatch(r"(rdmb-[a-z]+)-.*", str(name))
    return match.group(1) if match else str(name)


def _action(action: dict[str, Any]) -> str:
    kind, data = str(action["type"]), action["data"]
    if kind == "blockdev-backup":
        return f"{kind} {data['sync']} {short(data['device'])}->{short(data['target'])}"
    return f"{kind} {short(data['node'])}"


def _step(call: Call) -> str:
    args = call.arguments
    if call.command == "transaction":
        return "transaction " + " + ".join(_action(a) for a in args["actions"])
    if call.command == "blockdev-add":
        return f"blockdev-add {args['driver']} {short(args['node-name'])}"
    if call.command == "blockdev-del":
        return f"blockdev-del {short(args['node-name'])}"
    if call.command == "qom-set":
        return f"qom-set {args['property']}={short(args['value'])}"
    if call.command.startswith("block-dirty-bitmap-"):
        return f"{call.command} {short(args['node'])}"
    if call.command in ("block-export-add", "block-export-del"):
        return f"{call.command} {short(args['id'])}"
    return call.command
