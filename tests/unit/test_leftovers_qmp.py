"""What a killed run left in QEMU is found and removed, and nothing of anyone else's is
touched (against a scripted monitor holding a small block graph)."""

from __future__ import annotations

from typing import Any

import pytest

from libvirt_rdm_backup.errors import OperationError, QmpError
from libvirt_rdm_backup.qemu.leftovers import remove_leftovers
from tests.unit.fake_monitor import FakeMonitor

OUR_JOB = "rdmb-job-vdb-aaaaaa"
OUR_CBW, OUR_FLEECE = "rdmb-cbw-vdb-aaaaaa", "rdmb-fleece-vdb-aaaaaa"
OUR_TARGET = "rdmb-target-vdc-bbbbbb"


class Leftovers:
    """A QEMU after a killed run: our job, nodes (one filter still in front of the guest's
    vdb), exports and fd sets, next to libvirt's and another tool's."""

    def __init__(self, foreign_export: bool = True) -> None:
        self.monitor = FakeMonitor()
        self.vdb = self.monitor.plug("virtio-disk1", OUR_CBW)  # left behind our filter
        self.monitor.plug("virtio-disk2", "libvirt-2-format")
        self.monitor.add_job(OUR_JOB, current_progress=30)
        self.monitor.add_job("backup-vdc", current_progress=10)  # a libvirt backup job
        self.nodes = [OUR_CBW, OUR_FLEECE, OUR_TARGET, "libvirt-1-format",
                      "libvirt-1-storage", "libvirt-2-format", "libvirt-2-storage"]
        self.users = {OUR_CBW: ["guest"], OUR_FLEECE: [OUR_CBW], "libvirt-1-format": [OUR_CBW]}
        self.exports = [{"id": "rdmb-export-vdb-aaaaaa", "node-name": OUR_FLEECE}]
        if foreign_export:
            self.exports.append({"id": "libvirt-pull-vdc", "node-name": "libvirt-2-format"})
        self.fdsets = [
            {"fdset-id": 4000, "fds": [{"fd": 31, "opaque": "rdmb-fleece-vdb-aaaaaa"}]},
            {"fdset-id": 4001, "fds": [{"fd": 32, "opaque": "rdmb-fd-vdc-bbbbbb"},
                                       {"fd": 33, "opaque": "rdmb-fd-vdc-bbbbbb"}]},
            {"fdset-id": 0, "fds": [{"fd": 25, "opaque": "libvirt-3-storage"}]},
            {"fdset-id": 7, "fds": [{"fd": 40, "opaque": "rdmb-fd-vdd-cccccc"},
                                    {"fd": 41, "opaque": "someone-else"}]},
        ]
        m = self.monitor
        m.on("query-block-exports", lambda _a: self.exports)
        m.on("block-export-del", self._del_export)
        m.on("query-named-block-nodes", lambda _a: [{"node-name": n} for n in self.nodes])
        m.on("blockdev-del", self._del_node)
        m.on("query-fdsets", lambda _a: self.fdsets)
        m.on("remove-fd", self._remove_fd)
        m.fail("object-del", "object 'rdmb-tls-client' not found")
        m.on("x-debug-query-block-graph", lambda _a: {
            "nodes": [{"id": i, "name": n} for i, n in enumerate(self.nodes)],
            "edges": [{"parent": self.nodes.index(OUR_CBW),
                       "child": self.nodes.index("libvirt-1-format"), "name": "file"}]
            if OUR_CBW in self.nodes else []})

    def _del_export(self, args: dict[str, Any]) -> dict[str, Any]:
        self.exports = [e for e in self.exports if e["id"] != args["id"]]
        return {}

    def _del_node(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["node-name"]
        guests = [q for q, n in self.monitor.devices.items() if n == name]
        if guests or any(u in self.nodes for u in self.users.get(name, []) if u != "guest"):
            raise QmpError("blockdev-del", "GenericError", f"Node '{name}' is busy")
        self.nodes.remove(name)
        return {}

    def _remove_fd(self, args: dict[str, Any]) -> dict[str, Any]:
        self.fdsets = [s for s in self.fdsets if s["fdset-id"] != args["fdset-id"]]
        return {}


def test_a_killed_runs_leftovers_go_and_nothing_else() -> None:
    qemu = Leftovers()
    removed = remove_leftovers(qemu.monitor)

    assert qemu.monitor.arguments("job-cancel") == [{"id": OUR_JOB}]
    assert set(qemu.monitor.jobs) == {"backup-vdc"}
    assert qemu.monitor.jobs["backup-vdc"]["status"] == "running"
    assert qemu.exports == [{"id": "libvirt-pull-vdc", "node-name": "libvirt-2-format"}]
    assert qemu.monitor.arguments("block-export-del") == [
        {"id": "rdmb-export-vdb-aaaaaa", "mode": "hard"}]
    assert "nbd-server-stop" not in qemu.monitor.commands()  # it serves someone else too
    # the guest's vdb got its own node back, then our nodes could go
    assert qemu.monitor.devices[qemu.vdb] == "libvirt-1-format"
    assert qemu.nodes == ["libvirt-1-format", "libvirt-1-storage", "libvirt-2-format",
                          "libvirt-2-storage"]
    assert {a["node-name"] for a in qemu.monitor.arguments("blockdev-del")} == {
        OUR_CBW, OUR_FLEECE, OUR_TARGET}
    assert [s["fdset-id"] for s in qemu.fdsets] == [0, 7]  # not all of set 7 is ours
    assert removed == [
        f"job {OUR_JOB}", "export rdmb-export-vdb-aaaaaa",
        f"node {OUR_TARGET}", f"drive of {qemu.vdb}", f"node {OUR_CBW}", f"node {OUR_FLEECE}",
        "fdset 4000", "fdset 4001",
    ]


def test_the_nbd_server_goes_when_all_its_exports_were_ours() -> None:
    qemu = Leftovers(foreign_export=False)
    removed = remove_leftovers(qemu.monitor)
    assert "nbd-server-stop" in qemu.monitor.commands()
    assert "nbd server" in removed and qemu.exports == []


def test_nothing_is_touched_when_nothing_was_left() -> None:
    monitor = FakeMonitor()
    monitor.plug("virtio-disk1", "libvirt-1-format")
    monitor.add_job("backup-vdb")
    monitor.on("query-block-exports", [{"id": "libvirt-pull-vdb"}])
    monitor.on("query-named-block-nodes", [{"node-name": "libvirt-1-format"}])
    monitor.on("query-fdsets", [{"fdset-id": 0, "fds": [{"opaque": "libvirt-1-storage"}]}])
    monitor.fail("object-del", "object 'rdmb-tls-client' not found")

    monitor.on("qom-list", [{"name": "pr-helper0", "type": "child<pr-manager-helper>"}])

    assert remove_leftovers(monitor) == []
    assert [c for c in monitor.commands()
            if not c.startswith(("query-", "qom-list"))] == ["object-del"]


def test_a_key_secret_left_by_a_killed_run_is_removed() -> None:
    monitor = FakeMonitor()
    monitor.on("qom-list", [{"name": "rdmb-key-vdb-0a1b2c", "type": "child<secret>"},
                            {"name": "masterKey0", "type": "child<secret>"}])
    assert "secret rdmb-key-vdb-0a1b2c" in remove_leftovers(monitor)
    assert {"id": "masterKey0"} not in monitor.arguments("object-del")


def test_a_job_that_does_not_stop_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = FakeMonitor()
    monitor.add_job(OUR_JOB, status="aborting")
    monitor.on("job-cancel", {})  # accepted, but the job's storage does not answer
    monkeypatch.setenv("RDM_BACKUP_QMP_TIMEOUT", "0.3")  # the wait for it is that limit
    with pytest.raises(OperationError, match=f"{OUR_JOB} of an earlier run is still stopping"):
        remove_leftovers(monitor)
    assert "blockdev-del" not in monitor.commands()
