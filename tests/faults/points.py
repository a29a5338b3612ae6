"""Published points and their reference bytes: every fault test ends by restoring them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.backup import BackupResult
from tests.e2e.lab_vm import LabVM, same_bytes, snapshot_source


@dataclass
class Points:
    """Reference copies of the VM's raw disks at each published backup point."""

    vm: LabVM
    repo: str
    disks: list[str] | None = None  # the disks backed up (None: all)
    refs: dict[str, dict[str, Path]] = field(default_factory=dict)  # backup id -> disk -> copy

    def reference(self, tag: str) -> dict[str, Path]:
        """Copies of the raw disks as they are now (the guest is held still meanwhile)."""
        active = self.vm.dom.isActive()
        if active:
            self.vm.dom.suspend()
        try:
            return snapshot_source(self.vm, self.vm.workdir / f"ref-{tag}")
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
        self.refs[result.manifest.backup_id] = refs
        return result

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
