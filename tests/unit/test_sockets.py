"""The TCP listeners QEMU serves NBD on (``export``, ``receive``): addresses, options, errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.sockets import host_port, tcp_listener

EXE = Path(sys.executable).parent / "rdm-backup"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host, family", [
    ("127.0.0.1", socket.AF_INET),
    pytest.param("::1", socket.AF_INET6, marks=pytest.mark.skipif(
        not _ipv6_loopback(), reason="no IPv6 loopback here")),
    ("localhost", None),
])
def test_listens_with_nodelay_which_accepted_connections_inherit(
        host: str, family: socket.AddressFamily | None) -> None:
    with tcp_listener(host, 0) as listener:
        assert family is None or listener.family == family
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        bound = listener.getsockname()
        with socket.create_connection((bound[0], bound[1]), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_an_address_in_use_is_one_error_and_leaves_no_socket_open() -> None:
    with tcp_listener("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        before = _open_fds()
        with pytest.raises(OperationError) as caught:
            tcp_listener("127.0.0.1", port)
        assert _open_fds() == before
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert caught.value.exit_code == OperationError.exit_code


@pytest.mark.parametrize("host, problem", [
    ("no-such-host.invalid", ".+"),  # what the resolver says: not found, or no resolver
    ("192.0.2.1", "Cannot assign requested address"),  # TEST-NET-1: no interface has it
])
def test_an_address_that_cannot_be_listened_on_is_named(host: str, problem: str) -> None:
    before = _open_fds()
    with pytest.raises(OperationError, match=f"^cannot listen on {host}:10809: {problem}$"):
        tcp_listener(host, 10809)
    assert _open_fds() == before


def test_ipv6_addresses_are_written_in_brackets() -> None:
    assert host_port("::1", 10809) == "[::1]:10809"
    assert host_port("127.0.0.1", 10809) == "127.0.0.1:10809"
    assert host_port("backup1.example.com", 10809) == "backup1.example.com:10809"


@pytest.mark.bad_input
def test_receive_on_an_address_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with tcp_listener("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [str(EXE), "receive", "--volume", str(tmp_path / "vol.img"), "--listen",
             f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == OperationError.exit_code and proc.stdout == ""
    assert proc.stderr == (f"rdm-backup: error: cannot listen on 127.0.0.1:{port}: "
                           "Address already in use\n")
