"""x509 certificates for NBD over TLS in tests: a CA, a server and a client (openssl)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(base: Path) -> tuple[Path, Path]:
    """``(server_dir, client_dir)`` in QEMU's layout, for host 127.0.0.1 / localhost."""
    server, client, ca = base / "server", base / "client", base / "ca"
    for directory in (server, client, ca):
        directory.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=rdmb test CA", "-keyout", str(ca / "ca-key.pem"),
             "-out", str(ca / "ca-cert.pem"))
    for role, directory in (("server", server), ("client", client)):
        key, csr = directory / f"{role}-key.pem", directory / f"{role}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=rdmb {role}",
                 "-keyout", str(key), "-out", str(csr))
        ext = directory / "ext.cnf"
        usage = "serverAuth" if role == "server" else "clientAuth"
        ext.write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                       f"extendedKeyUsage={usage}\nkeyUsage=digitalSignature,keyEncipherment\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"),
                 "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(ext), "-out", str(directory / f"{role}-cert.pem"))
        (directory / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
        csr.unlink()
        ext.unlink()
    for path in base.rglob("*"):  # QEMU runs as libvirt-qemu and must read the client side
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(base, 0o755)
    return server, client
