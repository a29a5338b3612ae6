"""Security: a private repository, no secrets shown or stored, no shell, no secrets in argv.

One VM (a loop LUN ``vdb``, an iSCSI LUN ``sda``, a VNC display with a password) is backed
up, full then incremental, into a file repository and into an NBD volume served over TLS by
``rdm-backup receive``, through a libvirt URI that carries a password, every command at the
most verbose level. The tools the library runs are put behind shims on ``PATH`` that record
their argv.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import stat
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from tests.lab.tls import make_certificates
from tools import labkit
from tools.labkit import (
    RUN_TOKEN,
    DiskSpec,
    block_disk,
    free_port,
    guest_write,
    iscsi_disk,
    iscsi_target,
    loop_device,
    rdmb_tmpdir,
    unique_name,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parents[2]
EXE = ROOT / ".venv" / "bin" / "rdm-backup"
MiB = 1024 * 1024
PASSWORD = f"s3cret-{RUN_TOKEN}"
VNC_PASSWORD = "V" + uuid.uuid4().hex[:7]  # libvirt allows 8 characters
URI = f"qemu+tcp://rdmbuser:{PASSWORD}@127.0.0.1/system"
SHIMMED = ("qemu-img", "qemu-nbd", "fallocate", "tgtadm", "dmsetup", "ssh")
SHIM = """#!/bin/sh
{ printf '%s' "${0##*/}"; for arg in "$@"; do printf ' %s' "$arg"; done; echo; } \
    >> "$RDMB_ARGV_LOG"
PATH="$RDMB_REAL_PATH" exec "${0##*/}" "$@"
"""


@dataclass
class Runs:
    """Everything the module's commands printed and stored."""

    dom: libvirt.virDomain
    work: Path
    repo: Path
    locks: Path
    volume: Path
    argv_log: Path
    client_dir: Path
    secrets: list[str]  # the password, the VNC password, every line of every private key
    outputs: dict[str, str] = field(default_factory=dict)  # command → stdout + stderr
    results: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    server_argv: str = ""


def key_lines(directory: Path) -> list[str]:
    """The base64 lines of every private key under ``directory``."""
    lines = []
    for key in directory.rglob("*-key.pem"):
        lines += [line for line in key.read_text().splitlines()
                  if len(line) >= 40 and not line.startswith("-----")]
    assert lines
    return lines


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    with ExitStack() as stack:
        work = stack.enter_context(rdmb_tmpdir())
        loop_file, lun_file = work / "vdb.img", work / "sda.img"
        for path, size in ((loop_file, 64 * MiB), (lun_file, 16 * MiB)):
            with open(path, "wb") as stream:
                stream.truncate(size)
        loop = stack.enter_context(loop_device(loop_file))
        lun = stack.enter_context(iscsi_target(lun_file))
        vnc = DiskSpec("vnc", "<graphics type='vnc' autoport='yes' listen='127.0.0.1' "
                              f"passwd='{VNC_PASSWORD}'/>")
        dom = stack.enter_context(labkit.test_domain(unique_name("rdmb-sec"), [
            block_disk("vdb", loop), iscsi_disk("sda", lun.iqn, lun.lun), vnc]))
        pki = work / "pki"
        server_dir, client_dir = make_certificates(pki)
        shims = work / "shims"
        shims.mkdir()
        for name in SHIMMED:
            (shims / name).write_text(SHIM)
            (shims / name).chmod(0o755)
        result = Runs(dom, work, work / "repo", work / "locks", work / "volume.img",
                      work / "argv.log", client_dir,
                      [PASSWORD, VNC_PASSWORD, *key_lines(pki)])
        env = {**os.environ, "RDMB_ARGV_LOG": str(result.argv_log),
               "RDMB_REAL_PATH": os.environ["PATH"], "PATH": f"{shims}:{os.environ['PATH']}",
               "RDM_BACKUP_LOCK_DIR": str(result.locks)}

        def cli(name: str, *args: str, env_uri: bool = False, check: bool = True) -> str:
            # umask 0: the modes of what the tool creates must not depend on the caller's
            extra = {"LIBVIRT_DEFAULT_URI": URI} if env_uri else {}
            proc = subprocess.run([str(EXE), "-vv", *args], env=env | extra, umask=0,
                                  capture_output=True, text=True, timeout=300, check=False)
            assert proc.returncode == 0 or not check, (name, proc.stderr[-2000:])
            result.outputs[name] = proc.stdout + proc.stderr
            result.results[name] = proc
            return proc.stdout

        port = free_port()
        server_log = stack.enter_context(open(work / "receive.log", "w+"))
        server = subprocess.Popen(
            [str(EXE), "-vv", "receive", "--volume", str(result.volume), "--size",
             str(256 * MiB), "--listen", f"127.0.0.1:{port}", "--export", "rdmb-sec",
             "--tls-creds", str(server_dir), "--json"],
            env=env, umask=0, stdout=subprocess.PIPE, stderr=server_log, text=True)
        stack.callback(stop, server)
        assert server.stdout is not None
        volume = json.loads(server.stdout.readline())["uri"]
        wait_for_port(port)
        children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
        result.server_argv = " ".join(
            Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
            for pid in children)
        stack.callback(kill_leftover, children, "qemu-storage-daemon")

        name = dom.name()
        guest_write(dom, "vdb", 0x31, MiB, 2 * MiB)
        guest_write(dom, "sda", 0x32, MiB, MiB)
        for kind in ("full", "incremental"):
            out = cli(f"file {kind}", "backup", name, "--target", str(result.repo),
                      "--level", kind, "--json")
            assert json.loads(out)["level"] == kind
            out = cli(f"tls {kind}", "-c", URI, "backup", name, "--target", volume,
                      "--tls-creds", str(client_dir), "--disk", "vdb", "--level", kind, "--json")
            assert json.loads(out)["level"] == kind
            guest_write(dom, "vdb", 0x41, 8 * MiB, MiB)
        cli("file list", "list", "--target", str(result.repo), "--json")
        cli("file verify", "verify", "--target", str(result.repo), "--json")
        cli("file restore", "-c", URI, "restore", name, "--target", str(result.repo),
            "--disk", "vdb", "--to", str(work / "file-vdb.raw"), "--json")
        cli("tls list", "list", "--target", volume, "--tls-creds", str(client_dir))
        cli("tls verify", "verify", "--target", volume, "--tls-creds", str(client_dir))
        cli("tls restore", "restore", name, "--target", volume, "--tls-creds",
            str(client_dir), "--disk", "vdb", "--to", str(work / "tls-vdb.raw"), env_uri=True)
        cli("disks", "-c", URI, "disks", name, "--json")
        # bad input naming a password (checked by test_bad_input_with_a_password_is_redacted)
        cli("unreachable libvirt", "-c", URI.replace("127.0.0.1", "127.0.0.1:1"), "disks",
            name, check=False)
        cli("nbd target with a password", "backup", name, "--target",
            f"nbd://rdmbuser:{PASSWORD}@127.0.0.1:{port}/rdmb-sec", check=False)
        cli("directory target over a remote URI", "backup", name, "--target",
            str(work / "remote-repo"), env_uri=True, check=False)
        stop(server)
        server_log.seek(0)
        result.outputs["receive"] = server_log.read()
        yield result


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_leftover(pids: list[str], name: str) -> None:
    """SIGKILL what of ``pids`` still runs ``name`` (the server should have stopped it)."""
    for pid in pids:
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def leaked(secrets: list[str], data: bytes) -> list[str]:
    return [secret for secret in secrets if secret.encode() in data]


def file_leaks(secrets: list[str], path: Path) -> list[str]:
    """Secrets found in a file, read in blocks that overlap by the longest secret."""
    overlap = max(len(s) for s in secrets)
    found: set[str] = set()
    tail = b""
    with open(path, "rb") as stream:
        while block := stream.read(8 * MiB):
            if block != bytes(len(block)):  # the volume is mostly holes
                found |= set(leaked(secrets, tail + block))
            tail = block[-overlap:]
    return sorted(found)


# -- a private repository ------------------------------------------------------------------


@pytest.mark.lab
def test_repository_and_locks_are_private_after_full_and_incremental(runs: Runs) -> None:
    """Directories 0700, files 0600, whatever the umask: manifests, layers, chunk maps, locks."""
    seen: dict[str, int] = {}
    for top in (runs.repo, runs.locks):
        for path in [top, *top.rglob("*")]:
            seen[str(path.relative_to(runs.work))] = stat.S_IMODE(path.lstat().st_mode)
            assert not path.is_symlink(), path
            assert path.stat().st_uid == 0, path
    wrong = {path: oct(mode) for path, mode in seen.items()
             if mode != (0o700 if Path(runs.work / path).is_dir() else 0o600)}
    assert wrong == {}
    names = [Path(path).name for path in seen]
    for expected in ("rdm-backup-repository.json", ".lock", "manifest.json", "vdb.qcow2",
                     "sda.qcow2", "vdb.chunks"):
        assert expected in names, expected
    assert names.count("manifest.json") == 2 and names.count("vdb.qcow2") == 2
    assert any(name.endswith(".lock") and name != ".lock" for name in names)  # domain lock


# -- no secrets shown or stored ------------------------------------------------------------


@pytest.mark.lab
def test_outputs_and_logs_hold_no_secrets(runs: Runs) -> None:
    assert "DEBUG" in runs.outputs["file full"]  # the most verbose level did log
    assert "qmp> " in runs.outputs["tls full"]
    for name, text in runs.outputs.items():
        assert leaked(runs.secrets, text.encode()) == [], name


@pytest.mark.lab
@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "code", "words"), [
    pytest.param("unreachable libvirt", 4,
                 "cannot connect to qemu+tcp://rdmbuser:***@127.0.0.1:1/system",
                 id="unreachable-libvirt-uri"),
    pytest.param("nbd target with a password", 2,
                 "malformed NBD address in 'nbd://rdmbuser:***@", id="nbd-target-userinfo"),
    pytest.param("directory target over a remote URI", 2,
                 "a directory target needs a local libvirt connection: through "
                 "qemu+tcp://rdmbuser:***@127.0.0.1/system", id="directory-target-remote-uri"),
])
def test_bad_input_with_a_password_is_redacted(runs: Runs, name: str, code: int,
                                                words: str) -> None:
    proc = runs.results[name]
    assert proc.returncode == code, proc.stderr
    last = proc.stderr.splitlines()[-1]  # -vv: log lines come first
    assert last.startswith("rdm-backup: error: ") and words in last, last
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert leaked(runs.secrets, proc.stderr.encode()) == []
    assert not (runs.work / "remote-repo").exists()


@pytest.mark.lab
def test_stored_backups_hold_no_secrets(runs: Runs) -> None:
    files = [path for path in runs.repo.rglob("*") if path.is_file()]
    manifests = [path for path in files if path.name == "manifest.json"]
    assert len(manifests) == 2
    for manifest in manifests:
        xml = json.loads(manifest.read_text())["domain_xml"]
        assert "<graphics type='vnc'" in xml  # the domain XML is kept, without passwords
    for path in [*files, runs.volume]:
        assert file_leaks(runs.secrets, path) == [], path


@pytest.mark.lab
def test_argv_of_the_tools_holds_no_secrets(runs: Runs) -> None:
    """The TLS key goes to qemu-img and to the storage daemons as a directory path, never
    inline: the server's daemon is given its credentials object on its command line (it
    must exist when the daemon starts listening on the socket ``receive`` made), a
    restore's over QMP; no key material, password or secret in any argv."""
    argv = runs.argv_log.read_text()
    assert "qemu-img map" in argv and "tls-creds-x509" in argv
    assert "tls-creds-x509" in runs.outputs["tls restore"]  # object-add, in the -vv log
    assert f"dir={runs.client_dir}" in argv
    assert "qemu-storage-daemon" in runs.server_argv and "tls-creds-x509" in runs.server_argv
    assert leaked(runs.secrets, argv.encode()) == []
    assert leaked(runs.secrets, runs.server_argv.encode()) == []


# -- no shell ------------------------------------------------------------------------------

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput"), ("asyncio", "create_subprocess_shell")}


def shell_uses(source: str, filename: str) -> list[str]:
    """Calls that run a shell: ``shell=`` anything but False, os.system, os.popen, ..."""
    tree = ast.parse(source, filename)
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)
                for alias in node.names if (node.module, alias.name) in SHELL_CALLS}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in SHELL_CALLS) or (
                isinstance(func, ast.Name) and func.id in imported):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(func)}")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                found.append(f"{filename}:{node.lineno}: shell={ast.unparse(keyword.value)}")
    return found


def test_the_library_never_runs_a_shell() -> None:
    sources = sorted((ROOT / "libvirt_rdm_backup").rglob("*.py"))
    assert len(sources) > 40
    found = [use for path in sources for use in shell_uses(path.read_text(), str(path))]
    assert found == []


@pytest.mark.parametrize("source", [
    "import subprocess\nsubprocess.run('id', shell=True)",
    "import subprocess\nsubprocess.Popen(['id'], shell=1)",
    "from subprocess import run\nflag = True\nrun('id', shell=flag)",
    "import os\nos.system('id')",
    "import os\nos.popen('id').read()",
    "from os import system as s\ns('id')",
    "import subprocess\nsubprocess.getoutput('id')",
], ids=["shell-true", "shell-1", "shell-variable", "os-system", "os-popen", "imported-system",
        "getoutput"])
def test_the_shell_check_finds_shells(source: str) -> None:
    assert shell_uses(source, "sample.py")
    assert not shell_uses("import subprocess\nsubprocess.run(['id'], shell=False)", "ok.py")
