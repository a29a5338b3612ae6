"""Parsing ``--to rbd:…`` destinations: which cluster and user a restore writes with."""

from __future__ import annotations

import pytest

from libvirt_rdm_backup.domain.disks import RbdSource
from libvirt_rdm_backup.engine.restore_rbd import is_rbd, parse
from libvirt_rdm_backup.errors import UsageError

DISK = RbdSource(pool="vms", image="disk1", snapshot="s1", hosts=(("10.0.0.1", 6789),),
                 user="libvirt", secret_uuid="0d5f0c4a-0000-4000-8000-000000000001")


def test_the_disks_cluster_and_user_apply_without_conf_or_id() -> None:
    got = parse("rbd:rbd/new", DISK)
    assert (got.pool, got.image, got.namespace, got.snapshot) == ("rbd", "new", None, None)
    assert (got.hosts, got.user, got.secret_uuid) == (DISK.hosts, "libvirt", DISK.secret_uuid)


def test_conf_and_id_name_another_cluster_and_user() -> None:
    got = parse("rbd:p/ns/img?conf=/etc/ceph/other.conf&id=restore", DISK)
    assert (got.pool, got.namespace, got.image) == ("p", "ns", "img")
    assert (got.config_file, got.user, got.secret_uuid, got.hosts) == \
        ("/etc/ceph/other.conf", "restore", None, ())
    assert parse("rbd:p/img", None) == RbdSource(pool="p", image="img")


@pytest.mark.parametrize("spec", ["rbd:", "rbd:pool", "rbd:/img", "rbd:p/i/j/k", "rbd:p/i@s",
                                  "rbd:p/i?conf=rel.conf", "rbd:p/i?x=1", "rbd:p/i?id=a&id=b",
                                  "rbd:p/i?id=bad%20user", "rbd:p/i?", "rbd:p/-i",
                                  "rbd:p/i?conf=/etc/ceph%00x", "rbd:p/i?conf=/a%0Ab",
                                  f"rbd:p/i?conf=/{'a' * 4095}", "rbd:p/..", "rbd:p/i%00"])
def test_malformed_destinations_are_refused(spec: str) -> None:
    with pytest.raises(UsageError, match="malformed RBD destination"):
        parse(spec, DISK)


def test_only_rbd_colon_is_an_image() -> None:
    assert is_rbd("rbd:p/i") and not is_rbd("/dev/rbd0") and not is_rbd("./rbd:x")


def test_images_of_the_rbd_repository_being_read_are_refused() -> None:
    from typing import Any, cast

    from libvirt_rdm_backup.engine.rbd_store import RbdStore
    from libvirt_rdm_backup.engine.restore_rbd import refuse_repository_images
    from libvirt_rdm_backup.targets.uri import RbdAddress

    store = RbdStore(RbdAddress(pool="rbd", conf="/etc/ceph/ceph.conf", user="u", prefix="bk"),
                     cast(Any, None))
    with pytest.raises(UsageError, match="image of the backup repository"):
        refuse_repository_images(store, parse("rbd:rbd/bk.0d5f.vdb", None))
    for fine in ("rbd:rbd/other", "rbd:vms/bk.0d5f.vdb", "rbd:rbd/ns/bk.x"):
        refuse_repository_images(store, parse(fine, None))
    refuse_repository_images(None, parse("rbd:rbd/bk.x", None))
