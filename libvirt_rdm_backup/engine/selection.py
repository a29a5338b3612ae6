"""Which backups a user means: a domain's by UUID or name, one by id, or the newest."""

from __future__ import annotations

from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.errors import DamagedBackupError, NotFoundError
from libvirt_rdm_backup.repository.ids import check_backup_id
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.order import newest, newest_damage
from libvirt_rdm_backup.repository.store import Damage


def find_domain_backups(store: Store, domain: str) -> list[Manifest]:
    """Backups of a domain named by UUID or by the name recorded at backup time."""
    manifests = [
        m for m in store.scan().backups if domain in (m.domain_uuid, m.domain_name)
    ]
    if not manifests:
        damaged = {d.backup_id: d for d in domain_damage(store, domain, manifests)}
        last = newest_damage(damaged.values(), [])
        if last is not None:
            raise DamagedBackupError(last, damaged[last].problem)
        raise NotFoundError(f"no backups of domain {domain!r} in {store.name}")
    return manifests


def domain_damage(store: Store, domain: str, manifests: list[Manifest]) -> list[Damage]:
    """Unreadable backups of a domain named by UUID or by a name its ``manifests`` carry."""
    uuids = {m.domain_uuid for m in manifests} | {domain}
    return [d for d in store.scan().damaged if d.domain_uuid in uuids]


def choose_backup(store: Store, domain: str, backup_id: str | None) -> Manifest:
    """The requested backup of a domain (the newest when ``backup_id`` is None)."""
    if backup_id is not None:
        check_backup_id(backup_id)
    manifests = find_domain_backups(store, domain)
    damaged = {d.backup_id: d for d in domain_damage(store, domain, manifests)}
    if backup_id is None:
        newer = newest_damage(damaged.values(), manifests)
        if newer:  # never fall back to an older point unasked
            raise DamagedBackupError(newer, f"{damaged[newer].problem}; it is the newest "
                                     f"backup of {domain}: name an older backup to use it")
        last = newest(manifests)
        assert last is not None  # find_domain_backups found some
        return last
    for manifest in manifests:
        if manifest.backup_id == backup_id:
            return manifest
    if backup_id in damaged:
        raise DamagedBackupError(backup_id, damaged[backup_id].problem)
    raise NotFoundError(f"backup {backup_id} of domain {domain!r} not found")
