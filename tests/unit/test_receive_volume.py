"""The received volume file: created sparse and private, grown on request, never shrunk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.targets.receive import ensure_volume
from tools.labkit import free_port


def test_created_grown_never_shrunk(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    ensure_volume(str(path), 10 << 20)
    assert path.stat().st_size == 10 << 20 and path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_blocks == 0  # sparse
    with open(path, "r+b") as stream:
        stream.write(b"keep")
    ensure_volume(str(path), 20 << 20)
    assert path.stat().st_size == 20 << 20
    ensure_volume(str(path), 5 << 20)
    assert path.stat().st_size == 20 << 20
    assert path.read_bytes()[:4] == b"keep"


def test_devices_are_left_as_they_are(tmp_path: Path) -> None:
    link = tmp_path / "by-id"
    os.symlink("/dev/null", link)  # e.g. /dev/disk/by-id/... naming a block device
    ensure_volume(str(link), 1 << 20)
    assert link.is_symlink() and Path("/dev/null").stat().st_size == 0


def test_unreachable_volume_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="cannot create volume"):
        ensure_volume(str(tmp_path / "missing" / "vol.img"), 1 << 20)


@pytest.mark.bad_input
def test_a_volume_file_is_served_by_one_receive_at_a_time(tmp_path: Path) -> None:
    volume = tmp_path / "vol.img"
    ensure_volume(str(volume), 4 << 20)
    with exclusive(str(volume), "held"):  # as a first receive serving it holds it
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "rdm-backup"), "receive", "--volume", str(volume),
             "--socket", str(tmp_path / "nbd.sock")],
            capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 4 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "already being served" in proc.stderr
    assert not (tmp_path / "nbd.sock").exists()


EXE = Path(sys.executable).parent / "rdm-backup"


def start_receive(volume: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``receive`` started, and the address of its first output line."""
    proc = subprocess.Popen([str(EXE), "receive", "--volume", str(volume), "--size",
                             str(4 << 20), "--json", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate()
    return proc, json.loads(line)["uri"]


def stop_receive(proc: subprocess.Popen[str]) -> str:
    """SIGTERM: exit 0, nothing on stderr; what it printed after the first line."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "", err
    return out


def nbd_client(uri: str, tls_dir: Path | None = None) -> Any:
    import nbd

    handle = nbd.NBD()
    if tls_dir is not None:
        handle.set_tls(nbd.TLS_REQUIRE)
        handle.set_tls_certificates(str(tls_dir))
    handle.connect_uri(uri)
    return handle


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_served_as_soon_as_announced(tmp_path: Path, where: str) -> None:
    """A client connecting right after the first output line is served: no port polling."""
    volume = tmp_path / "vol.img"
    listen = (["--listen", f"127.0.0.1:{free_port()}"] if where == "tcp"
              else ["--socket", str(tmp_path / "nbd.sock")])
    proc, uri = start_receive(volume, *listen, "--export", "rdmb-now")
    try:
        handle = nbd_client(uri)  # at once
        assert handle.get_size() == 4 << 20 and not handle.is_read_only()
        handle.pwrite(b"served" * 100, 1 << 20)
        handle.flush()
        # a second client beside the first: readers are served alongside the writer
        reader = nbd_client(uri)
        assert bytes(reader.pread(600, 1 << 20)) == b"served" * 100
        reader.shutdown()
        handle.shutdown()
    finally:
        assert stop_receive(proc) == ""
    with open(volume, "rb") as stream:
        stream.seek(1 << 20)
        assert stream.read(600) == b"served" * 100
    assert not (tmp_path / "nbd.sock").exists()


def make_client(pki: Path, name: str, subject: str) -> Path:
    """Another client certificate signed by the test CA, in its own directory."""
    directory = pki / name
    directory.mkdir()
    ca = pki / "ca"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
                    str(directory / "client-key.pem"), "-out", str(directory / "c.csr")],
                   check=True, capture_output=True)
    (directory / "ext.cnf").write_text("extendedKeyUsage=clientAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(directory / "c.csr"), "-CA",
                    str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
                    "-CAcreateserial", "-days", "2", "-extfile", str(directory / "ext.cnf"),
                    "-out", str(directory / "client-cert.pem")], check=True,
                   capture_output=True)
    shutil.copy(ca / "ca-cert.pem", directory / "ca-cert.pem")
    return directory


def refused(uri: str, tls_dir: Path) -> bool:
    import nbd

    try:
        nbd_client(uri, tls_dir).shutdown()
    except nbd.Error:
        return True
    return False


def test_tls_clients_are_those_allowed(tmp_path: Path) -> None:
    from tests.lab.tls import make_certificates

    server, client = make_certificates(tmp_path / "pki")
    other = make_client(tmp_path / "pki", "other", "/C=GB/O=Example, Inc/CN=rdmb other")
    volume = tmp_path / "vol.img"

    # no client certificate in the server's directory: any client the CA signed
    proc, uri = start_receive(volume, "--listen", f"127.0.0.1:{free_port()}",
                              "--tls-creds", str(server))
    try:
        assert uri.startswith("nbds://")
        assert not refused(uri, client) and not refused(uri, other)
    finally:
        stop_receive(proc)

    # by default, the client whose certificate is in the server's directory
    shutil.copy(client / "client-cert.pem", server / "client-cert.pem")
    proc, uri = start_receive(volume, "--listen", f"127.0.0.1:{free_port()}",
                              "--tls-creds", str(server))
    try:
        assert not refused(uri, client)
        assert refused(uri, other)
    finally:
        stop_receive(proc)

    # named: in the certificate's order, as QEMU writes it
    proc, uri = start_receive(volume, "--listen", f"127.0.0.1:{free_port()}",
                              "--tls-creds", str(server),
                              "--allow-client-dn", r"C=GB,O=Example\, Inc,CN=rdmb other")
    try:
        assert refused(uri, client)
        assert not refused(uri, other)
    finally:
        stop_receive(proc)


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--allow-client-dn", "CN=x"], "needs --tls-creds"),
    (["--tls-creds", "{bad}"], "cannot read the certificate"),
])
def test_client_names_that_cannot_hold(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "client-cert.pem").write_text("not a certificate\n")
    argv = [arg.replace("{bad}", str(bad)) for arg in args]
    proc = subprocess.run([str(EXE), "receive", "--volume", str(tmp_path / "vol.img"),
                           "--listen", f"127.0.0.1:{free_port()}", *argv],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert not (tmp_path / "vol.img").exists()
