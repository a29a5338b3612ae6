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
                                  "rbd:p/i?id=bad%20user", "rbd:p/i?", "rbd:p/-i"])
def test_malformed_destinations_are_refused(spec: str) -> None:
    with pytest.raises(UsageError, match="malformed RBD destination"):
        parse(spec, DISK)


def test_only_rbd_colon_is_an_image() -> None:
    assert is_rbd("rbd:p/i") and not is_rbd("/dev/rbd0") and not is_rbd("./rbd:x")
