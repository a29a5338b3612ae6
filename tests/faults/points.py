"""Published points and their reference bytes: every fault test ends by restoring them all."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.backup import BackupResult
from tests.lab.domains import running_state, slow_down_job
from tools.labkit import LabVM, same_bytes, snapshot_source

EXE = Path(sys.executable).parent / "rdm-backup"


@dataclass
class Points:
    """Reference copies of the VM's raw disks at each published backup point."""

    vm: LabVM
    repo: str
    disks: list[str] | None = None  # the disks backed up (None: all)
    refs: dict[str, dict[str, Path]] = field(default_factory=dict)  # backup id -> disk -> copy
    extra: dict[str, str] = field(default_factory=dict)  # more disks: target -> host device

    def reference(self, tag: str) -> dict[str, Path]:
        """Copies of the raw disks as they are now (the guest is held still meanwhile)."""
        active = running_state(self.vm.dom)[0] == libvirt.VIR_DOMAIN_RUNNING
        if active:
            self.vm.dom.suspend()
        try:
            dest = self.vm.workdir / f"ref-{tag}"
            refs = snapshot_source(self.vm, dest)
            for disk, device in self.extra.items():
                refs[disk] = dest / f"{disk}.raw"
                subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", device,
                                str(refs[disk])], check=True)
            return refs
        finally:
            if active:
                self.vm.dom.resume()

    def backup(self, **kwargs: object) -> BackupResult:
        """Back up (the guest is still for the whole run) and keep the reference."""
        refs = self.reference(str(len(self.refs)))
        if self.disks is not None:
            kwargs.setdefault("disks", self.disks)
            refs = {disk: path for disk, path in refs.items() if disk in self.disks}
        result = api.backup(self.vm.name, self.repo, **kwargs)  # type: ignore[arg-type]
        self.keep(result.manifest.backup_id, refs)
        return result

    def keep(self, backup_id: str, refs: dict[str, Path]) -> None:
        """Record the reference copies of a point published by a run of the CLI."""
        manifest = next(m for m in api.list_backups(self.repo) if m.backup_id == backup_id)
        self.refs[backup_id] = {disk: ref for disk, ref in refs.items()
                                if manifest.disk(disk) is not None}

    def start_slowed(self, disk: str, redirty: Callable[[], None], *args: str
                     ) -> subprocess.Popen[str]:
        """Start ``rdm-backup backup`` of the VM into the repository (with ``args``) and
        slow its job of ``disk`` down to 1 MiB/s, so that a fault can hit it mid-copy.

        A run whose job ended before it could be slowed is a good point like any other: it
        is kept, ``redirty`` gives the disk something to copy again, and a new run starts.
        """
        for attempt in range(5):
            refs = self.reference(f"slowed-{attempt}")
            proc = subprocess.Popen([str(EXE), "backup", self.vm.name, "--target", self.repo,
                                     "--json", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            if slow_down_job(self.vm.dom, disk, proc):
                return proc
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            self.keep(json.loads(out)["backup_id"], refs)
            redirty()
        raise AssertionError(f"the job of {disk} ended too fast to be slowed, five times")

    def restore_every_point(self) -> int:
        """Restore each published point of each disk and compare; returns how many."""
        published = [m.backup_id for m in api.list_backups(self.repo)]
        assert published == list(self.refs), "published points differ from the good runs"
        out = self.vm.workdir / "restored.raw"
        count = 0
        for backup_id, refs in self.refs.items():
            for disk, ref in refs.items():
                api.restore(self.vm.name, self.repo, disk, str(out), backup_id=backup_id)
                assert same_bytes(out, ref), f"{disk} of {backup_id} restored different bytes"
                out.unlink()
                count += 1
        report = api.verify(self.repo)
        assert report.ok and len(report.checks) == count
        return count
