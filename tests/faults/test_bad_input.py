"""Bad input, end to end through ``rdm-backup``: each one is refused.

Refused means: exit code 2 (bad input), 3 (not found) or 4 (the repository is unusable), one
line on stderr and nothing on stdout, no traceback; nothing created or published (the
repository, the scratch directory and the working directory are as they were, no
``/tmp/pwned``), the restore target untouched, the VM still running.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab.domains import assert_running, running_state
from tools.labkit import (
    LOOP_OFFSET,
    RUN_TOKEN,
    LabVM,
    MiB,
    guest_write,
    lab_vm,
    loop_device,
    make_file,
    same_bytes,
    unique_name,
)

pytestmark = pytest.mark.lab
bad_input = pytest.mark.bad_input
EXE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rdm-backup"
PWNED = Path("/tmp/pwned")
LOOP_SIZE = 64 * MiB


@dataclass
class Lab:
    """The VM, a repository with one backup of its vdb, and a reference copy of vdb then."""

    vm: LabVM
    repo: Path
    backup_id: str
    backup_dir: Path
    reference: Path
    scratch: Path  # restore targets are made here
    cwd: Path  # the CLI runs here: relative paths would land in it


def rdm_backup(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], cwd=lab.cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_vm(loop_size=LOOP_SIZE) as vm:
        guest_write(vm.dom, "vdb", 0x5A, MiB, 2 * MiB)
        reference = vm.workdir / "vdb-at-backup.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", vm.loop,
                        str(reference)], check=True)
        (vm.workdir / "scratch").mkdir()
        (vm.workdir / "cwd").mkdir()
        lab = Lab(vm, vm.workdir / "repo", "", Path(), reference, vm.workdir / "scratch",
                  vm.workdir / "cwd")
        proc = rdm_backup(lab, "backup", vm.name, "--target", str(lab.repo), "--disk", "vdb",
                          "--json")
        assert proc.returncode == 0, proc.stderr
        lab.backup_id = json.loads(proc.stdout)["backup_id"]
        lab.backup_dir = lab.repo / vm.uuid / lab.backup_id
        assert (lab.backup_dir / "manifest.json").is_file()
        yield lab


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root``: (mode, size, mtime)."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def content(path: str | Path) -> str:
    """Digest of a file's or a block device's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def state(lab: Lab, watch: Sequence[str | Path]) -> dict[str, Any]:
    return {
        "files": tree(lab.repo) | tree(lab.scratch) | tree(lab.cwd),
        "backups": sorted(p.name for p in lab.repo.rglob("manifest.json")),
        "watched": {str(p): content(p) for p in watch},
        "pwned": PWNED.exists(),
        "running": running_state(lab.vm.dom),
    }


def refused(lab: Lab, code: int, words: str, *args: str,
            watch: Sequence[str | Path] | None = None) -> str:
    """Run the CLI and check that it refused: exit ``code``, one line holding ``words``."""
    before = state(lab, watch or [])
    proc = rdm_backup(lab, *args)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("rdm-backup: error: ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert words in proc.stderr, proc.stderr
    assert state(lab, watch or []) == before
    assert not PWNED.exists()
    assert_running(lab.vm.dom)
    return proc.stderr


# -- backup: domain, disks, targets, chains ----------------------------------------------

MALFORMED_UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6g"


@bad_input
@pytest.mark.parametrize(("domain", "code", "words"), [
    pytest.param(f"rdmb-no-such-{RUN_TOKEN}", 3, "not found", id="unknown-name"),
    pytest.param(MALFORMED_UUID, 3, "not found", id="malformed-uuid"),
    pytest.param(str(uuid.uuid4()), 3, "not found", id="uuid-nowhere"),
    pytest.param("a/b", 2, "malformed domain name", id="slash"),
    pytest.param("vm\nname", 2, "malformed domain name", id="newline"),
    pytest.param("", 2, "malformed domain name", id="empty"),
])
def test_backup_of_a_bad_domain(lab: Lab, domain: str, code: int, words: str) -> None:
    refused(lab, code, words, "backup", domain, "--target", str(lab.scratch / "new-repo"))


@bad_input
@pytest.mark.parametrize(("disk", "code", "words"), [
    pytest.param("vdz", 3, "has no disk 'vdz'", id="unknown"),
    pytest.param("vda", 2, "vda is not a raw disk: image file (qcow2)", id="qcow2"),
    pytest.param("../vdb", 2, "malformed disk name", id="dotdot"),
    pytest.param("vd/b", 2, "malformed disk name", id="slash"),
    pytest.param("vdb;touch /tmp/pwned", 2, "malformed disk name", id="semicolon"),
    pytest.param("$(touch /tmp/pwned)", 2, "malformed disk name", id="command-substitution"),
    pytest.param("", 2, "malformed disk name", id="empty"),
])
def test_backup_of_a_bad_disk(lab: Lab, disk: str, code: int, words: str) -> None:
    refused(lab, code, words, "backup", lab.vm.name, "--target", str(lab.scratch / "new-repo"),
            "--disk", disk)


@bad_input
@pytest.mark.parametrize(("target", "words"), [
    pytest.param("nbd://127.0.0.1:notaport/x", "malformed NBD address", id="port-not-a-number"),
    pytest.param("nbd://127.0.0.1:0/x", "malformed NBD address", id="port-0"),
    pytest.param("nbd://127.0.0.1:65536/x", "Port out of range", id="port-65536"),
    pytest.param("nbd://127.0.0.1", "malformed NBD export name ''", id="no-export"),
    pytest.param("nbd://", "malformed NBD export name ''", id="nbd-empty"),
    pytest.param("nbd://127.0.0.1/../x", "malformed NBD export name", id="export-dotdot"),
    pytest.param("nbd://[::1/x", "malformed target", id="broken-ipv6"),
    pytest.param("http://127.0.0.1/x", "unsupported target scheme 'http'", id="http"),
    pytest.param("smb://host/share", "unsupported target scheme 'smb'", id="smb"),
    pytest.param("file://", "malformed file target", id="file-empty"),
    pytest.param("file://otherhost/x", "malformed file target", id="file-remote-host"),
    pytest.param("file://{scratch}/x%00y", "malformed file target", id="file-nul"),
    pytest.param("file://{scratch}/x%0Ay", "malformed file target", id="file-newline"),
    pytest.param("nbd+unix:///x", "needs ?socket=/absolute/path", id="unix-no-socket"),
    pytest.param("nbd+unix:///x?socket=rel.sock", "needs ?socket=/absolute/path",
                 id="unix-relative-socket"),
    pytest.param("nbd+unix:///x?socket=/a&socket=/b", "needs ?socket=/absolute/path",
                 id="unix-two-sockets"),
    pytest.param("nbd+unix:///x?socket=/tmp/a%00b", "needs ?socket=/absolute/path",
                 id="unix-nul-socket"),
    pytest.param("nbds://127.0.0.1/x", "give --tls-creds", id="tls-without-creds"),
    pytest.param("nbd://192.0.2.1/x", "would send disk data unencrypted", id="plain-remote"),
    pytest.param("", "malformed target ''", id="empty"),
])
def test_backup_to_a_malformed_target(lab: Lab, target: str, words: str) -> None:
    # a path that was taken would be in the scratch directory, where it shows (and is removed)
    target = target.replace("{scratch}", str(lab.scratch))
    refused(lab, 2, words, "backup", lab.vm.name, "--target", target, "--disk", "vdb")


@bad_input
def test_backup_into_a_directory_that_is_not_a_repository(lab: Lab) -> None:
    other = lab.scratch / f"data-{unique_name()}"
    other.mkdir()
    (other / "precious.txt").write_text("not a backup")
    try:
        refused(lab, 2, "not empty and not a backup repository", "backup", lab.vm.name,
                "--target", str(other), "--disk", "vdb")
        refused(lab, 2, "is not a backup repository", "verify", "--target", str(other))
        for command in (["backup", lab.vm.name, "--disk", "vdb"], ["verify"], ["list"]):
            refused(lab, 2, "is not a directory", *command,
                    "--target", str(other / "precious.txt"))
        assert [p.name for p in other.iterdir()] == ["precious.txt"]
        assert (other / "precious.txt").read_text() == "not a backup"
    finally:
        (other / "precious.txt").unlink()
        other.rmdir()


@bad_input
@pytest.mark.parametrize("chain", [
    pytest.param("../../x", id="traversal"),
    pytest.param("a/b", id="slash"),
    pytest.param("a;touch /tmp/pwned", id="semicolon"),
    pytest.param("$(touch /tmp/pwned)", id="command-substitution"),
    pytest.param("`touch /tmp/pwned`", id="backticks"),
    pytest.param("a\nb", id="newline"),
    pytest.param("x" * 300, id="very-long"),
    pytest.param("", id="empty"),
    pytest.param(".hidden", id="leading-dot"),
])
def test_backup_with_a_bad_chain_name(lab: Lab, chain: str) -> None:
    # into the existing repository: not a new backup, no new chain, no file anywhere
    refused(lab, 2, "malformed chain name", "backup", lab.vm.name, "--target", str(lab.repo),
            "--disk", "vdb", "--chain", chain)


@bad_input
def test_export_with_a_bad_chain_name(lab: Lab) -> None:
    refused(lab, 2, "malformed chain name", "export", lab.vm.name, "--disk", "vdb",
            "--target", str(lab.repo), "--chain", "../../x", "--timeout", "1")


# -- retention: prune and backup --prune -----------------------------------------------------

@bad_input
@pytest.mark.parametrize(("args", "code", "words"), [
    pytest.param([], 2, "give at least one --keep-* option", id="no-keep"),
    pytest.param(["--keep-last", "0"], 2, "not a positive whole number: '0'", id="keep-0"),
    pytest.param(["--keep-daily", "-3"], 2, "not a positive whole number: '-3'",
                 id="keep-negative"),
    pytest.param(["--keep-weekly", "two"], 2, "not a positive whole number: 'two'",
                 id="keep-not-a-number"),
    pytest.param(["--keep-monthly", "1.5"], 2, "not a positive whole number", id="keep-1.5"),
    pytest.param(["--keep-yearly", "9" * 40], 2, "not a positive whole number",
                 id="keep-huge"),
    pytest.param(["--keep-hourly", "1;touch /tmp/pwned"], 2, "not a positive whole number",
                 id="keep-semicolon"),
    pytest.param(["--keep-last", "1", "--chain", "../../x"], 2, "malformed chain name",
                 id="chain-dotdot"),
    pytest.param(["--keep-last", "1", "--chain", "nosuchchain"], 3,
                 "no backups in chain 'nosuchchain'", id="chain-without-backups"),
])
def test_prune_with_bad_retention_options(lab: Lab, args: list[str], code: int,
                                          words: str) -> None:
    # with and without --dry-run: nothing is planned, printed or removed
    for dry_run in ([], ["--dry-run"]):
        refused(lab, code, words, "prune", lab.vm.name, "--target", str(lab.repo), *args,
                *dry_run)


@bad_input
@pytest.mark.parametrize(("args", "words"), [
    pytest.param([], "give a DOMAIN or --all", id="neither-domain-nor-all"),
    pytest.param(["{vm}", "--all"], "not both", id="domain-and-all"),
])
def test_prune_of_no_domain_or_two(lab: Lab, args: list[str], words: str) -> None:
    args = [a.replace("{vm}", lab.vm.name) for a in args]
    refused(lab, 2, words, "prune", *args, "--target", str(lab.repo), "--keep-last", "1")


@bad_input
@pytest.mark.parametrize(("args", "words"), [
    pytest.param(["--prune"], "--prune needs at least one --keep-* option",
                 id="prune-without-keep"),
    pytest.param(["--keep-daily", "7"], "--keep-* options need --prune", id="keep-without-prune"),
    pytest.param(["--prune", "--keep-last", "0"], "not a positive whole number",
                 id="prune-keep-0"),
])
def test_backup_with_bad_retention_options(lab: Lab, args: list[str], words: str) -> None:
    refused(lab, 2, words, "backup", lab.vm.name, "--target", str(lab.repo), "--disk", "vdb",
            *args)


# -- restore and verify: backup ids, disks, domains --------------------------------------

BAD_IDS = [
    pytest.param("../x", id="dotdot"),
    pytest.param("a/b", id="slash"),
    pytest.param("*", id="glob"),
    pytest.param("", id="empty"),
    pytest.param("latest", id="word"),
]


@bad_input
@pytest.mark.parametrize("backup_id", BAD_IDS)
def test_restore_of_a_malformed_backup_id(lab: Lab, backup_id: str) -> None:
    refused(lab, 2, "malformed backup id", "restore", lab.vm.name, "--target", str(lab.repo),
            "--disk", "vdb", "--to", str(lab.scratch / "out.raw"), "--backup", backup_id)


@bad_input
@pytest.mark.parametrize("backup_id", BAD_IDS)
def test_verify_of_a_malformed_backup_id(lab: Lab, backup_id: str) -> None:
    refused(lab, 2, "malformed backup id", "verify", "--target", str(lab.repo),
            "--backup", backup_id)


@bad_input
def test_malformed_backup_id_of_a_domain_without_backups(lab: Lab) -> None:
    # the id is checked first: malformed input is exit 2 whatever the repository holds
    refused(lab, 2, "malformed backup id", "verify", "rdmb-no-such-vm", "--target",
            str(lab.repo), "--backup", "../x")


@bad_input
@pytest.mark.parametrize(("args", "code", "words"), [
    pytest.param(["--disk", "sda"], 3, "has no disk 'sda'", id="disk-not-backed-up"),
    pytest.param(["--disk", "vda"], 3, "has no disk 'vda'", id="disk-not-raw"),
    pytest.param(["--disk", "../vdb"], 2, "malformed disk name", id="disk-dotdot"),
    pytest.param(["--disk", ""], 2, "malformed disk name", id="disk-empty"),
    pytest.param(["--disk", "vdb", "--backup", "20200101T000000Z-abcdef"], 3, "not found",
                 id="backup-id-unknown"),
])
def test_restore_of_what_the_repository_lacks(lab: Lab, args: list[str], code: int,
                                             words: str) -> None:
    refused(lab, code, words, "restore", lab.vm.name, "--target", str(lab.repo),
            "--to", str(lab.scratch / "out.raw"), *args)


@bad_input
@pytest.mark.parametrize(("domain", "target", "words"), [
    pytest.param("rdmb-no-such-vm", "repo", "no backups of domain", id="unknown-domain"),
    pytest.param(str(uuid.uuid4()), "repo", "no backups of domain", id="uuid-nowhere"),
    pytest.param(None, "missing", "no repository at", id="missing-repository"),
])
def test_restore_from_where_nothing_is(lab: Lab, domain: str | None, target: str,
                                       words: str) -> None:
    repo = lab.repo if target == "repo" else lab.scratch / "no-such-repo"
    refused(lab, 3, words, "restore", domain or lab.vm.name, "--target", str(repo),
            "--disk", "vdb", "--to", str(lab.scratch / "out.raw"))


# -- restore targets ---------------------------------------------------------------------

Target = tuple[str, list[str], int, str]  # --to, extra args, exit code, words


def _file(lab: Lab, size: int, data: bool = True) -> Path:
    path = lab.scratch / f"{unique_name('target')}.raw"
    if data:
        make_file(path, size)
    else:
        with open(path, "wb") as stream:
            stream.truncate(size)
    return path


def too_small(lab: Lab, stack: ExitStack) -> Target:
    path = _file(lab, 16 * MiB)
    stack.callback(path.unlink)
    return str(path), [], 2, "is too small"


def read_only_loop(lab: Lab, stack: ExitStack) -> Target:
    path = _file(lab, LOOP_SIZE)  # data on it: zeroing it first would show
    stack.callback(path.unlink)
    device = subprocess.run(["losetup", "-f", "--show", "-r", str(path)], check=True,
                            capture_output=True, text=True).stdout.strip()
    stack.callback(subprocess.run, ["losetup", "-d", device], check=True)
    return device, ["--force"], 2, "is not writable"


def immutable_file(lab: Lab, stack: ExitStack) -> Target:
    path = _file(lab, LOOP_SIZE)
    stack.callback(path.unlink)
    subprocess.run(["chattr", "+i", str(path)], check=True)
    stack.callback(subprocess.run, ["chattr", "-i", str(path)], check=True)
    return str(path), ["--force"], 2, "is not writable"


def _read_only_mount(lab: Lab, stack: ExitStack) -> tuple[Path, Path]:
    source = lab.scratch / unique_name("rw")
    source.mkdir()
    stack.callback(source.rmdir)
    mount = lab.scratch / unique_name("ro")
    mount.mkdir()
    stack.callback(mount.rmdir)
    subprocess.run(["mount", "--bind", str(source), str(mount)], check=True)
    stack.callback(subprocess.run, ["umount", str(mount)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
    return source, mount


def file_on_read_only_mount(lab: Lab, stack: ExitStack) -> Target:
    source, mount = _read_only_mount(lab, stack)
    make_file(source / "disk.raw", LOOP_SIZE)
    stack.callback((source / "disk.raw").unlink)
    return str(mount / "disk.raw"), [], 2, "is not writable"


def new_file_on_read_only_mount(lab: Lab, stack: ExitStack) -> Target:
    _source, mount = _read_only_mount(lab, stack)
    return str(mount / "new.raw"), [], 2, "is not writable"


def running_domain_disk(lab: Lab, stack: ExitStack) -> Target:
    return lab.vm.loop, [], 2, "in use by running domain"


def symlink_to_running_domain_disk(lab: Lab, stack: ExitStack) -> Target:
    link = lab.scratch / unique_name("link")
    link.symlink_to(lab.vm.loop)
    stack.callback(link.unlink)
    return str(link), [], 2, "in use by running domain"


def other_loop_over_running_domain_disk(lab: Lab, stack: ExitStack) -> Target:
    device = stack.enter_context(loop_device(lab.vm.loop_file, offset=LOOP_OFFSET,
                                             sizelimit=LOOP_SIZE))
    return device, [], 2, "in use by running domain"


def _loop_with_data(lab: Lab, stack: ExitStack) -> str:
    path = _file(lab, LOOP_SIZE)  # data on it: zeroing it first would show
    stack.callback(path.unlink)
    return stack.enter_context(loop_device(path))


def _mount_ext4(lab: Lab, stack: ExitStack, device: str) -> Path:
    """An ext4 made on ``device`` and mounted read-only in the scratch directory until the
    test ends.

    Read-only, with its inode tables and journal initialised by mkfs: the kernel then writes
    nothing to the device (a read-write mount goes on writing now and then: ext4lazyinit, the
    journal's commits, the superblock's write counters) while the test checks that nothing
    did."""
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    device], check=True)
    mount = lab.scratch / unique_name("mnt")
    mount.mkdir()
    stack.callback(mount.rmdir)
    subprocess.run(["mount", "-o", "ro", device, str(mount)], check=True)
    stack.callback(subprocess.run, ["umount", str(mount)], check=True)
    return mount


def mounted_loop(lab: Lab, stack: ExitStack) -> Target:
    device = _loop_with_data(lab, stack)
    return device, ["--force"], 2, f"mounted at {_mount_ext4(lab, stack, device)}"


def swap_loop(lab: Lab, stack: ExitStack) -> Target:
    device = _loop_with_data(lab, stack)
    subprocess.run(["mkswap", "-q", device], check=True, capture_output=True)
    subprocess.run(["swapon", device], check=True)
    stack.callback(subprocess.run, ["swapoff", device], check=True)
    return device, ["--force"], 2, f"active swap {device}"


def exclusively_opened_loop(lab: Lab, stack: ExitStack) -> Target:
    """A program (not QEMU) holds the device open with O_EXCL, as a filesystem would."""
    device = _loop_with_data(lab, stack)
    holder = subprocess.Popen(
        ["python3", "-c", "import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); "
         "print('held', flush=True); sys.stdin.read()", device],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stack.callback(holder.wait, 10)
    stack.callback(holder.stdin.close)  # type: ignore[union-attr]
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return device, ["--force"], 2, "the kernel holds it exclusively"


def loop_served_by_qemu_nbd(lab: Lab, stack: ExitStack) -> Target:
    """A QEMU program that is no domain (qemu-nbd) has the device open."""
    device = _loop_with_data(lab, stack)
    sock = lab.scratch / unique_name("nbd.sock")
    server = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", str(sock), "--persistent",
                               device], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(server.wait, 10)
    stack.callback(server.terminate)
    stack.callback(lambda: sock.unlink(missing_ok=True))
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return device, [], 2, f"qemu-nbd process {server.pid}"


def running_domain_disk_with_libvirtd_unreachable(lab: Lab, stack: ExitStack) -> Target:
    """The tool cannot ask libvirtd (as when it is down): /proc still names the domain."""
    return lab.vm.loop, ["-c", f"qemu+unix:///system?socket=/nonexistent-{RUN_TOKEN}.sock"], \
        2, f"in use by running domain {lab.vm.name}"


def file_behind_a_mounted_loop(lab: Lab, stack: ExitStack) -> Target:
    """The target is a regular file that a mounted loop device shows."""
    path = _file(lab, LOOP_SIZE)
    stack.callback(path.unlink)
    device = stack.enter_context(loop_device(path))
    return str(path), ["--force"], 2, f"mounted at {_mount_ext4(lab, stack, device)}"


def file_behind_running_domain_disk_with_libvirtd_unreachable(lab: Lab, stack: ExitStack
                                                              ) -> Target:
    """The file under the loop device a running domain uses, and libvirt cannot be asked."""
    return str(lab.vm.loop_file), \
        ["-c", f"qemu+unix:///system?socket=/nonexistent-{RUN_TOKEN}.sock"], \
        2, f"in use by running domain {lab.vm.name}"


def _in_repository(name: str) -> Callable[[Lab, ExitStack], Target]:
    def target(lab: Lab, stack: ExitStack) -> Target:
        return str(lab.backup_dir / name), ["--force"], 2, "inside the backup repository"

    target.__name__ = f"repository_{name}"
    return target


def new_file_in_repository(lab: Lab, stack: ExitStack) -> Target:
    return str(lab.repo / "restored.raw"), [], 2, "inside the backup repository"


def hard_link_to_data_file(lab: Lab, stack: ExitStack) -> Target:
    link = lab.scratch / unique_name("hardlink")
    os.link(lab.backup_dir / "vdb.qcow2", link)
    stack.callback(link.unlink)
    return str(link), ["--force"], 2, "inside the backup repository"


def repository_through_a_bind_mount(lab: Lab, stack: ExitStack) -> Target:
    mount = lab.scratch / unique_name("bind")
    mount.mkdir()
    stack.callback(mount.rmdir)
    subprocess.run(["mount", "--bind", str(lab.repo), str(mount)], check=True)
    stack.callback(subprocess.run, ["umount", str(mount)], check=True)
    data = mount / lab.vm.uuid / lab.backup_id / "vdb.qcow2"
    return str(data), ["--force"], 2, "inside the backup repository"


def loop_over_data_file(lab: Lab, stack: ExitStack) -> Target:
    device = subprocess.run(["losetup", "-f", "--show", "-r", str(lab.backup_dir / "vdb.qcow2")],
                            check=True, capture_output=True, text=True).stdout.strip()
    stack.callback(subprocess.run, ["losetup", "-d", device], check=True)
    return device, ["--force"], 2, "inside the backup repository"


def directory(lab: Lab, stack: ExitStack) -> Target:
    return str(lab.scratch), [], 2, "is a directory"


def missing_directory(lab: Lab, stack: ExitStack) -> Target:
    return f"/nonexistent-{RUN_TOKEN}/dir/out.raw", [], 2, "does not exist"


def empty_path(lab: Lab, stack: ExitStack) -> Target:
    return "", [], 2, "restore target path is empty"


def character_device(lab: Lab, stack: ExitStack) -> Target:
    return "/dev/null", ["--force"], 2, "neither a file nor a block device"


@bad_input
@pytest.mark.parametrize("make", [
    too_small, read_only_loop, immutable_file, file_on_read_only_mount,
    new_file_on_read_only_mount, running_domain_disk, symlink_to_running_domain_disk,
    other_loop_over_running_domain_disk, mounted_loop, swap_loop, exclusively_opened_loop,
    loop_served_by_qemu_nbd, running_domain_disk_with_libvirtd_unreachable,
    file_behind_a_mounted_loop, file_behind_running_domain_disk_with_libvirtd_unreachable,
    _in_repository("vdb.qcow2"),
    _in_repository("manifest.json"), _in_repository("vdb.chunks"), new_file_in_repository,
    hard_link_to_data_file, repository_through_a_bind_mount, loop_over_data_file, directory,
    missing_directory, empty_path, character_device,
], ids=lambda make: make.__name__)
def test_restore_to_a_bad_target(lab: Lab, make: Callable[[Lab, ExitStack], Target]) -> None:
    with ExitStack() as stack:
        to, extra, code, words = make(lab, stack)
        watch = [to] if to and os.path.exists(to) and not os.path.isdir(to) \
            and to != "/dev/null" else []
        refused(lab, code, words, "restore", lab.vm.name, "--target", str(lab.repo),
                "--disk", "vdb", "--to", to, *extra, watch=watch)
    assert not os.path.exists(f"/nonexistent-{RUN_TOKEN}")
    # the backup read is intact
    proc = rdm_backup(lab, "verify", "--target", str(lab.repo))
    assert proc.returncode == 0, proc.stderr


# -- restore of several disks, to the original devices, and --define ------------------------

@bad_input
@pytest.mark.parametrize(("args", "code", "words"), [
    pytest.param(["--disk", "vdb", "--to", "{scratch}/o.raw", "--to-original"], 2,
                 "not allowed with", id="to-and-to-original"),
    pytest.param(["--disk", "vdb", "--to-dir", "{scratch}", "--to-original"], 2,
                 "not allowed with", id="to-dir-and-to-original"),
    pytest.param(["--all-disks", "--disk", "vdb", "--to-dir", "{scratch}"], 2,
                 "not allowed with", id="all-disks-and-disk"),
    pytest.param(["--all-disks", "--to", "{scratch}/o.raw"], 2, "--to writes one disk",
                 id="to-with-all-disks"),
    pytest.param(["--to-original"], 2, "give --disk DEV or --all-disks", id="no-disk"),
    pytest.param(["--disk", "vdb", "--to", "{scratch}/o.raw", "--dry-run"], 2,
                 "--dry-run works with", id="dry-run-with-to"),
    pytest.param(["--disk", "vdb", "--to-original", "--define", "rdmb-x"], 2,
                 "leave out --disk", id="define-with-disk"),
    pytest.param(["--all-disks", "--to-dir", "{scratch}", "--start"], 2,
                 "--start needs --define", id="start-without-define"),
    pytest.param(["--all-disks", "--to-dir", "{scratch}", "--define", "../x"], 2,
                 "malformed domain name", id="define-dotdot"),
    pytest.param(["--all-disks", "--to-dir", "{scratch}", "--define", "{vm}"], 2,
                 "already exists", id="define-existing-name"),
    pytest.param(["--all-disks", "--to-dir", f"/nonexistent-{RUN_TOKEN}"], 2,
                 "does not exist", id="to-dir-missing"),
    pytest.param(["--all-disks", "--to-dir", "{repo}"], 2, "inside the backup repository",
                 id="to-dir-repository"),
    pytest.param(["--disk", "vdb", "--to-original"], 2, "in use by running domain",
                 id="original-in-use"),
    pytest.param(["--disk", "vdb", "--to-original", "--dry-run"], 2,
                 "in use by running domain", id="original-in-use-dry-run"),
    pytest.param(["--disk", "vdz", "--to-original"], 3, "has no disk 'vdz'",
                 id="original-unknown-disk"),
])
def test_restore_of_several_disks_refused(lab: Lab, args: list[str], code: int,
                                          words: str) -> None:
    args = [a.replace("{scratch}", str(lab.scratch)).replace("{vm}", lab.vm.name)
            .replace("{repo}", str(lab.repo)) for a in args]
    refused(lab, code, words, "restore", lab.vm.name, "--target", str(lab.repo), *args,
            watch=[lab.vm.loop])


# -- restoring in place --------------------------------------------------------------------


def test_restore_in_place_onto_the_disk_of_the_shut_off_vm(lab: Lab) -> None:
    """Refused while the VM runs (above); allowed once it is shut off: byte-identical."""
    vm = lab.vm
    guest_write(vm.dom, "vdb", 0x77, 8 * MiB, 4 * MiB)  # written after the backup
    assert not same_bytes(vm.loop, lab.reference)
    vm.dom.destroy()
    try:
        proc = rdm_backup(lab, "restore", vm.name, "--target", str(lab.repo), "--disk", "vdb",
                          "--to", vm.loop, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["backup_id"] == lab.backup_id
        assert same_bytes(vm.loop, lab.reference)
    finally:
        vm.dom.create()
