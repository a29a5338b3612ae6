"""``rdm-backup receive`` serving a backup volume file on loopback, for tests; stopped by pid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tools.labkit import free_port

EXE = Path(sys.executable).parent / "rdm-backup"


SERVING = "^qemu-storage-d"  # pgrep/pkill pattern of receive's serving child (15-char name)


class VolumeServer:
    """A volume file served by ``rdm-backup receive`` (its qemu-storage-daemon child does
    the serving)."""

    def __init__(self, path: Path, size: int = 16 << 30, export: str = "rdmb-vol",
                 tls_dir: Path | None = None) -> None:
        self.path, self.size, self.export, self.tls_dir = path, size, export, tls_dir
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def uri(self) -> str:
        scheme = "nbd" if self.tls_dir is None else "nbds"
        return f"{scheme}://127.0.0.1:{self.port}/{self.export}"

    def start(self, size: int | None = None) -> None:
        """Serve the volume (grown to ``size`` when given); it is served once ``receive``
        printed its address (no waiting for the port)."""
        if size is not None:
            self.size = size
        self.proc = subprocess.Popen(
            [str(EXE), "receive", "--volume", str(self.path), "--listen",
             f"127.0.0.1:{self.port}", "--export", self.export, "--size", str(self.size),
             "--json", *(["--tls-creds", str(self.tls_dir)] if self.tls_dir else [])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline())["uri"] == self.uri

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop serving; with SIGKILL the server dies as in a crash (its daemon first)."""
        if sig == signal.SIGKILL and self.proc is not None:
            subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid), SERVING], check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
