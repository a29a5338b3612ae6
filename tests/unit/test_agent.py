"""The hypervisor agent (``rdm-backup agent``) and its SSH client: contracts without a lab.

The agent's request is untrusted: whatever arrives, the answer is one JSON line and no
traceback. The client turns every failure into one line and the project's error classes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import agent
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    StorageError,
    UsageError,
)
from libvirt_rdm_backup.remote import AgentAddress, SshAgent, parse_agent_uri
from libvirt_rdm_backup.storage import map_disk
from libvirt_rdm_backup.storage.base import RawDiskMapping, StorageNode


class FakeAgent:
    """A mapping agent that knows one device, /dev/fake0."""

    name = "fake"

    def can_map(self, disk: RawDisk) -> bool:
        return disk.source_path == "/dev/fake0"

    def map(self, disk: RawDisk) -> StorageNode:
        return StorageNode(kind="disk", name="fake0", path="/dev/fake0", size=1 << 20,
                           identity={"serial": "F00"})


class BrokenAgent:
    """A mapping agent that fails the way a bug would (not with a project error)."""

    name = "broken"

    def can_map(self, disk: RawDisk) -> bool:
        return True

    def map(self, disk: RawDisk) -> StorageNode:
        raise KeyError("boom\nsecond line")


def block_disk(**changes: Any) -> dict[str, Any]:
    disk = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk", bus="virtio",
                   serial="S1", source_path="/dev/fake0", size=1 << 20).to_dict()
    disk.update(changes)
    return disk


def serve(raw: bytes, agents: list[Any] | None = None) -> tuple[int, dict[str, Any], str]:
    out = io.StringIO()
    code = agent.serve(io.BytesIO(raw), out, agents or [FakeAgent()])
    text = out.getvalue()
    return code, json.loads(text), text


# -- handle ---------------------------------------------------------------------------


def test_version() -> None:
    answer = agent.handle({"op": "version"})
    assert answer["ok"] is True and answer["version"] and answer["protocol"] == 1
    assert answer["ops"] == ["map", "version"]


def test_map_gives_the_mapping_document() -> None:
    answer = agent.handle({"op": "map", "disk": block_disk()}, [FakeAgent()])
    assert answer["ok"] is True
    mapping = RawDiskMapping.from_dict(answer["mapping"])
    assert mapping.disk == "vdb" and mapping.agent == "fake"
    assert mapping.root.path == "/dev/fake0"
    assert mapping.identifiers["serial"] == "S1"


def test_map_of_an_iscsi_disk_round_trips() -> None:
    disk = RawDisk(target="sda", source_kind=SourceKind.ISCSI, device="lun", bus="scsi",
                   iscsi=IscsiSource("127.0.0.1", 3260, "iqn.2024-01.lab.rdmb:t1", 1))
    assert agent.disk_from_request(disk.to_dict()) == disk
    hostdev = RawDisk(target="hostdev0", source_kind=SourceKind.SCSI_HOSTDEV, device="lun",
                      source_path="scsi_host3:0:0:1")
    assert agent.disk_from_request(hostdev.to_dict()) == hostdev


def test_storage_errors_are_answers() -> None:
    answer = agent.handle({"op": "map", "disk": block_disk(source_path="/dev/none")},
                          [FakeAgent()])
    assert answer == {"ok": False, "error_class": "StorageError", "exit_code": 4,
                      "error": "no storage agent can map disk vdb (source /dev/none)"}


def test_internal_errors_are_one_line_answers() -> None:
    answer = agent.handle({"op": "map", "disk": block_disk()}, [BrokenAgent()])
    assert answer["ok"] is False and answer["exit_code"] == 4
    assert answer["error"].startswith("internal error: KeyError") and "\n" not in answer["error"]


@pytest.mark.parametrize("request_value, fragment", [
    ([], "not a JSON object"),
    ({}, "no op"),
    ({"op": 7}, "no op"),
    ({"op": "rm -rf /"}, "unknown op"),
    ({"op": "map"}, "no disk"),
    ({"op": "map", "disk": "vdb"}, "not a JSON object"),
    ({"op": "map", "disk": block_disk(target=None)}, "target is missing"),
    ({"op": "map", "disk": block_disk(target=["vdb"])}, "target is not a string"),
    ({"op": "map", "disk": block_disk(target="")}, "target is empty"),
    ({"op": "map", "disk": block_disk(target="vdb\nvdc")}, "control characters"),
    ({"op": "map", "disk": block_disk(source_kind="nfs")}, "unknown source_kind"),
    ({"op": "map", "disk": block_disk(source_path="dev/fake0")}, "absolute path"),
    ({"op": "map", "disk": block_disk(source_path="/dev/fake0\x00")}, "control characters"),
    ({"op": "map", "disk": block_disk(source_path="/" + "a" * 5000)}, "too long"),
    ({"op": "map", "disk": block_disk(size=-1)}, "size"),
    ({"op": "map", "disk": block_disk(size=True)}, "size"),
    ({"op": "map", "disk": block_disk(size="1024")}, "size"),
    ({"op": "map", "disk": block_disk(readonly="no")}, "readonly"),
    ({"op": "map", "disk": block_disk(serial={"a": 1})}, "serial is not a string"),
    ({"op": "map", "disk": block_disk(source_kind="iscsi", iscsi=None)}, "iscsi source"),
    ({"op": "map", "disk": block_disk(iscsi={"host": "h", "port": 1, "iqn": "i", "lun": 0,
                                             "extra": 1})}, "exactly"),
    ({"op": "map", "disk": block_disk(iscsi={"host": "-oProxyCommand=x", "port": 3260,
                                             "iqn": "iqn.x", "lun": 0})}, "iscsi.host"),
    ({"op": "map", "disk": block_disk(iscsi={"host": "h\n", "port": 3260, "iqn": "iqn.x",
                                             "lun": 0})}, "iscsi.host"),
    ({"op": "map", "disk": block_disk(iscsi={"host": "h", "port": 70000, "iqn": "iqn.x",
                                             "lun": 0})}, "iscsi.port"),
    ({"op": "map", "disk": block_disk(iscsi={"host": "h", "port": 3260, "iqn": "iqn x/../",
                                             "lun": 0})}, "iscsi.iqn"),
    ({"op": "map", "disk": {f"k{i}": i for i in range(100)}}, "too many keys"),
])
def test_malformed_requests_are_refused(request_value: Any, fragment: str) -> None:
    answer = agent.handle(request_value, [FakeAgent()])
    assert answer["ok"] is False, answer
    assert answer["exit_code"] == 2 and answer["error_class"] == "UsageError"
    assert fragment in answer["error"] and "\n" not in answer["error"]


def test_unknown_disk_keys_are_ignored() -> None:
    answer = agent.handle({"op": "map", "disk": block_disk(comment="x" * 10000, extra=[1])},
                          [FakeAgent()])
    assert answer["ok"] is True


# -- main / serve: the wire ---------------------------------------------------------


def test_one_json_line_and_exit_zero() -> None:
    code, answer, text = serve(json.dumps({"op": "map", "disk": block_disk()}).encode())
    assert code == 0 and answer["ok"] is True
    assert text.endswith("\n") and text.count("\n") == 1


def test_the_exit_status_is_the_answers_exit_code() -> None:
    code, answer, _ = serve(b'{"op": "frobnicate"}')
    assert code == 2 and answer["ok"] is False and answer["exit_code"] == 2
    code, answer, _ = serve(json.dumps({"op": "map", "disk": block_disk()}).encode(),
                            [BrokenAgent()])
    assert code == 4 and answer["ok"] is False and answer["exit_code"] == 4


@pytest.mark.parametrize("raw", [
    b"",
    b"   \n",
    b"not json",
    b'{"op": "version"',
    b'["op", "version"]',
    b'"version"',
    b'{"op": NaN}',
    b'{"size": Infinity}',
    b"\xff\xfe{}",
    b'{"op": "map", "disk": {"size": ' + b"9" * 5000 + b"}}",  # int digit limit
    b"[" * 100000 + b"]" * 100000,  # nested too deeply
    b'{"op": "version", "pad": "' + b"x" * agent.MAX_REQUEST + b'"}',  # too large
])
def test_unparsable_requests_exit_two(raw: bytes) -> None:
    code, answer, text = serve(raw)
    assert code == 2 and text.count("\n") == 1
    assert answer["ok"] is False and answer["exit_code"] == 2
    assert len(answer["error"]) < 300


def test_a_huge_request_is_not_read_to_its_end() -> None:
    class Endless(io.RawIOBase):
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            size = len(buffer)
            buffer[:size] = b" " * size
            self.served += size
            return size

    stream = Endless()
    out = io.StringIO()
    assert agent.serve(stream, out) == 2  # type: ignore[arg-type]
    assert "larger than" in json.loads(out.getvalue())["error"]
    assert stream.served <= agent.MAX_REQUEST + 1


def test_text_streams_work_too() -> None:
    out = io.StringIO()
    assert agent.main(io.StringIO('{"op": "version"}'), out) == 0
    assert json.loads(out.getvalue())["ok"] is True


def test_ssh_original_command_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "cat /etc/shadow")
    code, answer, _ = serve(b'{"op": "version"}')
    assert code == 0 and answer["ok"] is True


def test_noise_on_fd1_does_not_corrupt_the_answer(monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A storage tool writing to stdout while the request runs goes to stderr instead."""
    def noisy(disk: RawDisk, agents: Any = None) -> RawDiskMapping:
        os.write(1, b"noise from a C library\n")
        print("noise from python", flush=True)
        return map_disk(disk, [FakeAgent()])

    monkeypatch.setattr(agent, "map_disk", noisy)
    request = json.dumps({"op": "map", "disk": block_disk()}).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(request)))
    assert agent.main() == 0
    captured = capfd.readouterr()
    assert captured.out.count("\n") == 1 and json.loads(captured.out)["ok"] is True
    assert "noise from a C library" in captured.err and "noise from python" in captured.err
    print("after")  # fd 1 is restored
    assert capfd.readouterr().out == "after\n"


def test_the_module_runs_as_a_program() -> None:
    proc = subprocess.run([sys.executable, "-m", "libvirt_rdm_backup.agent"],
                          input='{"op": "version"}', capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1
    assert json.loads(proc.stdout)["ok"] is True
    proc = subprocess.run([sys.executable, "-m", "libvirt_rdm_backup.agent"],
                          input="{", capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and json.loads(proc.stdout)["ok"] is False
    assert "Traceback" not in proc.stderr


# -- parse_agent_uri -----------------------------------------------------------------


@pytest.mark.parametrize("uri, expected", [
    ("ssh://hv1", AgentAddress("hv1")),
    ("ssh://hv1/", AgentAddress("hv1")),
    ("ssh://root@hv1.example.com:2222", AgentAddress("hv1.example.com", "root", 2222)),
    ("ssh://backup_user@10.0.0.1", AgentAddress("10.0.0.1", "backup_user")),
    ("ssh://[::1]:22", AgentAddress("::1", None, 22)),
    ("ssh://u@[fe80::1]", AgentAddress("fe80::1", "u")),
])
def test_agent_uris_accepted(uri: str, expected: AgentAddress) -> None:
    assert parse_agent_uri(uri) == expected
    assert parse_agent_uri(expected.uri) == expected


@pytest.mark.parametrize("uri", [
    "", "hv1", "root@hv1", "http://hv1", "SSH://hv1", "ssh://", "ssh://:22", "ssh://hv1:0",
    "ssh://hv1:65536", "ssh://hv1:22:33", "ssh://hv1:port", "ssh://user:pw@hv1",
    "ssh://-oProxyCommand=sh", "ssh://-x@hv1", "ssh://us er@hv1", "ssh://hv1/path",
    "ssh://hv1?x=1", "ssh://hv1#f", "ssh://hv1\n", "ssh://hv1 ", "ssh://[nothex]",
    "ssh://[::1", "ssh://::1", "ssh://999.1.1.1", "ssh://hv_1", "ssh://-hv1", "ssh://hv-.x",
    "ssh://a@b@hv1", "ssh://" + "a" * 64, "ssh://%68v1", "ssh+tls://hv1",
])
def test_agent_uris_refused(uri: str) -> None:
    with pytest.raises(UsageError, match="invalid"):
        parse_agent_uri(uri)


# -- SshAgent, with fake ssh clients ----------------------------------------------------


def fake_ssh(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def answering(tmp_path: Path, answer: dict[str, Any] | str, code: int = 0) -> str:
    text = answer if isinstance(answer, str) else json.dumps(answer)
    (tmp_path / "answer").write_text(text + "\n")
    return fake_ssh(tmp_path, f"cat >/dev/null\ncat {tmp_path / 'answer'}\nexit {code}")


def test_argv(tmp_path: Path) -> None:
    key, known = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("PRIVATE KEY MATERIAL")
    known.write_text("")
    argv = SshAgent("ssh://backup@hv1:2222", identity=str(key), known_hosts=str(known),
                    ssh="/usr/bin/ssh").argv()
    assert argv[0] == "/usr/bin/ssh" and "-T" in argv
    for option in ("BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={known}",
                   "IdentitiesOnly=yes"):
        assert argv[argv.index(option) - 1] == "-o"
    assert argv[argv.index("-i") + 1] == str(key)
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "backup"
    assert argv[-4:] == ["--", "hv1", "rdm-backup", "agent"]
    assert "PRIVATE KEY MATERIAL" not in " ".join(argv)
    plain = SshAgent("ssh://hv1", ssh="/usr/bin/ssh").argv()
    assert "-i" not in plain and "-p" not in plain and "-l" not in plain
    assert "StrictHostKeyChecking=yes" in plain


def test_bad_settings_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="identity file"):
        SshAgent("ssh://hv1", identity=str(tmp_path / "none"))
    with pytest.raises(UsageError, match="known hosts"):
        SshAgent("ssh://hv1", known_hosts=str(tmp_path / "none"))
    with pytest.raises(UsageError, match="timeout"):
        SshAgent("ssh://hv1", timeout=0)
    with pytest.raises(UsageError, match="invalid agent address"):
        SshAgent("hv1")


def test_through_a_real_agent_process(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, f"exec {sys.executable} -m libvirt_rdm_backup.agent")
    remote = SshAgent("ssh://hv1", ssh=ssh)
    assert remote.version()["protocol"] == 1
    disk = RawDisk(target="vdq", source_kind=SourceKind.BLOCK, device="disk",
                   source_path=str(tmp_path / "no-such-device"))
    with pytest.raises(StorageError, match=r"^agent ssh://hv1: no storage agent can map"):
        remote.map_disk(disk)
    with pytest.raises(UsageError, match="unknown op"):
        remote.request({"op": "delete-everything"})


def test_mapping_answers_are_checked(tmp_path: Path) -> None:
    mapping = RawDiskMapping(disk="vdb", agent="fake", root=FakeAgent().map(
        RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk")))
    disk = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                   source_path="/dev/fake0")
    good = SshAgent("ssh://hv1", ssh=answering(tmp_path, {"ok": True,
                                                           "mapping": mapping.to_dict()}))
    assert good.map_disk(disk).to_dict() == mapping.to_dict()
    other = RawDisk(target="vdc", source_kind=SourceKind.BLOCK, device="disk")
    with pytest.raises(OperationError, match="mapping of 'vdb' for disk vdc"):
        good.map_disk(other)
    bad = SshAgent("ssh://hv1", ssh=answering(tmp_path, {"ok": True, "mapping": {"x": 1}}))
    with pytest.raises(OperationError, match="malformed mapping"):
        bad.map_disk(disk)


@pytest.mark.parametrize("answer, code, error, fragment", [
    ({"ok": False, "error": "no such LUN", "error_class": "StorageError", "exit_code": 4}, 0,
     StorageError, "no such LUN"),
    ({"ok": False, "error": "gone", "error_class": "Bogus", "exit_code": 3}, 0,
     NotFoundError, "gone"),
    ({"ok": False, "error": "iscsi-inq failed: x", "error_class": "CommandError",
      "exit_code": 4}, 0, OperationError, "iscsi-inq failed"),
    ({"ok": False, "error": "line one\nline two", "exit_code": "x"}, 2, OperationError,
     "line one line two"),
    ("garbage", 0, OperationError, "sent an answer that is not JSON"),
    ('{"ok": "yes"}', 0, OperationError, "not a JSON object with a boolean 'ok'"),
    ("", 127, OperationError, "gave no answer: exit 127"),
])
def test_failed_answers(tmp_path: Path, answer: dict[str, Any] | str, code: int,
                        error: type[Exception], fragment: str) -> None:
    remote = SshAgent("ssh://hv1", ssh=answering(tmp_path, answer, code))
    with pytest.raises(error) as caught:
        remote.version()
    assert type(caught.value) is error
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_ssh_failures_are_one_line(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, "echo 'some banner' >&2\n"
                             "echo 'root@hv1: Permission denied (publickey).' >&2\nexit 255")
    with pytest.raises(OperationError) as caught:
        SshAgent("ssh://root@hv1", ssh=ssh).version()
    assert str(caught.value) == ("ssh to ssh://root@hv1 failed: root@hv1: Permission denied "
                                 "(publickey).")


def test_timeouts(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, "exec sleep 30")
    with pytest.raises(OperationError, match="did not answer within 0.5 s"):
        SshAgent("ssh://hv1", ssh=ssh, timeout=0.5).version()


def test_missing_ssh_client(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="not installed"):
        SshAgent("ssh://hv1", ssh=str(tmp_path / "no-ssh")).version()
