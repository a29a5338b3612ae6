"""The hypervisor agent over real SSH: a private sshd on loopback with a forced command.

The backup server's half (:class:`SshAgent`) asks ``rdm-backup agent`` through OpenSSH
for what only the hypervisor can answer; here both halves run on the lab host, the
agent behind an ``authorized_keys`` entry ``command="... agent",restrict``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.errors import OperationError, StorageError, UsageError
from libvirt_rdm_backup.remote import SshAgent
from tests.lab.sshd import SshdInfo, agent_command, loopback_sshd
from tests.unit.test_agent_admission import PATTERN, listener, nobody_connected, untouched
from tools.labkit import MiB, lab_vm

pytestmark = pytest.mark.lab

REMOTE_URI = "qemu+tcp://127.0.0.1/system"
RDM_BACKUP = Path(sys.executable).parent / "rdm-backup"


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshdInfo]:
    assert RDM_BACKUP.is_absolute() and RDM_BACKUP.exists()
    with loopback_sshd(command=agent_command()) as info:
        yield info


def agent_of(info: SshdInfo, identity: Path | None = None) -> SshAgent:
    return SshAgent(info.uri, identity=str(identity or info.identity),
                    known_hosts=str(info.known_hosts), timeout=120)


def test_mappings_from_the_agent_equal_the_local_ones(sshd: SshdInfo) -> None:
    """Disks found through libvirt's remote URI, mapped on the 'hypervisor' over SSH."""
    with lab_vm(loop_size=64 * MiB) as vm:
        local = {m.disk: m.to_dict() for m in api.map_disks(vm.name)}
        assert set(local) == {"vdb", "sda"}
        agent = agent_of(sshd)
        for inventory in (api.discover(vm.name), api.discover(vm.uuid, REMOTE_URI)):
            assert {d.target for d in inventory.raw} == set(local)
            for disk in inventory.raw:
                assert agent.map_disk(disk).to_dict() == local[disk.target], disk.target
        kinds = {m["disk"]: m["agent"] for m in local.values()}
        assert kinds == {"vdb": "sysfs", "sda": "iscsi"}


@pytest.mark.bad_input
def test_version_and_clean_errors(sshd: SshdInfo) -> None:
    agent = agent_of(sshd)
    answer = agent.version()
    assert answer["ok"] is True and answer["protocol"] == 1 and "map" in answer["ops"]
    with pytest.raises(UsageError) as unknown:
        agent.request({"op": "shell", "command": "id"})
    assert str(unknown.value).startswith(f"agent {sshd.uri}: unknown op 'shell'")
    with pytest.raises(UsageError) as malformed:
        agent.request({"op": "map", "disk": {"target": "vdb", "source_kind": "block"}})
    assert "malformed disk: device is missing" in str(malformed.value)
    with pytest.raises(UsageError, match="control characters"):
        agent.request({"op": "map", "disk": {"target": "vdb", "source_kind": "block",
                                             "device": "disk", "source_path": "/dev/x\x00"}})
    missing = RawDisk(target="vdz", source_kind=SourceKind.BLOCK, device="disk",
                      source_path="/dev/rdmb-no-such-device")
    with pytest.raises(StorageError) as unmappable:
        agent.map_disk(missing)
    assert "no storage agent can map disk vdz" in str(unmappable.value)
    for err in (unknown.value, malformed.value, unmappable.value):
        assert "\n" not in str(err) and "Traceback" not in str(err)


@pytest.mark.bad_input
def test_only_block_devices_and_the_domains_luns_are_looked_up(sshd: SshdInfo,
                                                               tmp_path: Path) -> None:
    """A file, a link to the VM's loop device, a portal no domain uses: refused, untouched."""
    agent = agent_of(sshd)
    victim = tmp_path / "sacrificial"
    victim.write_bytes(PATTERN)
    with lab_vm(loop_size=64 * MiB) as vm, listener() as sock:
        loop = next(d for d in api.discover(vm.name).raw if d.target == "vdb")
        assert loop.source_path is not None
        link = tmp_path / "link-to-loop"
        link.symlink_to(loop.source_path)
        agent.map_disk(loop)  # the VM's own block device is mapped
        lun = next(d for d in api.discover(vm.name).raw if d.iscsi is not None)
        agent.map_disk(lun)  # and its LUN, which a domain here uses
        port = sock.getsockname()[1]
        foreign = RawDisk(target="sdz", source_kind=SourceKind.ISCSI, device="lun",
                          iscsi=IscsiSource("127.0.0.1", port, "iqn.2024-01.lab.rdmb:no", 1))
        for disk in (RawDisk(target="vdz", source_kind=SourceKind.BLOCK, device="disk",
                             source_path=str(path)) for path in (victim, link)):
            with untouched(victim), pytest.raises(UsageError) as refused:
                agent.map_disk(disk)
            assert "refused" in str(refused.value) and "\n" not in str(refused.value)
        with pytest.raises(UsageError, match="not a disk of any domain on this host"):
            agent.map_disk(foreign)
        assert nobody_connected(sock)


@pytest.mark.bad_input
def test_a_wrong_key_is_refused(sshd: SshdInfo) -> None:
    other = sshd.new_key("unauthorized_key")
    with pytest.raises(OperationError) as refused:
        agent_of(sshd, identity=other).version()
    message = str(refused.value)
    assert message.startswith(f"ssh to {sshd.uri} failed:") and "Permission denied" in message
    assert "\n" not in message


@pytest.mark.bad_input
def test_an_unknown_host_key_is_refused(sshd: SshdInfo) -> None:
    empty = sshd.workdir / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(OperationError, match="Host key verification failed"):
        SshAgent(sshd.uri, identity=str(sshd.identity), known_hosts=str(empty)).version()


@pytest.mark.bad_input
def test_the_key_runs_the_agent_and_nothing_else(sshd: SshdInfo) -> None:
    """The client's own command is ignored: the forced command answers, on stdin's request."""
    proc = subprocess.run(sshd.ssh_argv("cat", "/etc/hostname"), input='{"op": "version"}',
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True and proc.stdout.count("\n") == 1
    proc = subprocess.run(sshd.ssh_argv("id"), input="", capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and json.loads(proc.stdout)["ok"] is False
    assert "Traceback" not in proc.stderr
    # no forwarding either: a remote port forward is refused by 'restrict'
    base = sshd.ssh_argv()
    split = base.index("--")
    forward = subprocess.run(
        [*base[:split], "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:9",
         "-N", *base[split:]], input="", capture_output=True, text=True, timeout=60,
        check=False)
    assert forward.returncode == 255 and "forwarding failed" in forward.stderr


def test_backup_server_drives_the_hypervisor_by_uuid(sshd: SshdInfo) -> None:
    """The whole remote flow: libvirt remote URI, SSH agent for mappings, NBD volume."""
    from tests.e2e.test_nbd_target import reference, restore_compare
    from tests.lab.volume_server import VolumeServer
    from tools.labkit import guest_write, rdmb_tmpdir

    with lab_vm(loop_size=128 * MiB) as vm, rdmb_tmpdir() as work:
        server = VolumeServer(work / "volume.img")
        server.start()
        try:
            guest_write(vm.dom, "vdb", 0x61, 3 * MiB, MiB)
            refs0 = reference(vm, "agent0")
            argv = ["--connect", "qemu+tcp://127.0.0.1/system", "backup", vm.uuid,
                    "--target", server.uri, "--disk", "vdb", "--disk", "sda",
                    "--agent", sshd.uri, "--agent-identity", str(sshd.identity),
                    "--agent-known-hosts", str(sshd.known_hosts), "--json"]
            proc = subprocess.run([RDM_BACKUP, *argv], capture_output=True, text=True,
                                  check=False, timeout=300)
            assert proc.returncode == 0, proc.stderr
            first = json.loads(proc.stdout)
            guest_write(vm.dom, "vdb", 0x62, 60 * MiB, MiB)
            refs1 = reference(vm, "agent1")
            proc = subprocess.run([RDM_BACKUP, *argv], capture_output=True, text=True,
                                  check=False, timeout=300)
            assert proc.returncode == 0, proc.stderr
            second = json.loads(proc.stdout)
            assert second["level"] == "incremental" and second["domain_uuid"] == vm.uuid
            restore_compare(vm, server.uri, first["backup_id"], refs0)
            restore_compare(vm, server.uri, second["backup_id"], refs1)
            # the mapping reached the target side and equals the hypervisor's own
            manifest = api.list_backups(server.uri, vm.uuid)[-1]
            local = {m.disk: m.to_dict() for m in api.map_disks(vm.name)}
            for record in manifest.disks:
                assert record.mapping is not None and record.mapping_error is None
                assert record.mapping.to_dict() == local[record.disk.target]
        finally:
            server.stop()
