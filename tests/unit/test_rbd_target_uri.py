"""The ``rbd://`` target form: what it accepts, and one clear line for what it refuses."""

from __future__ import annotations

import pytest

from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.storage.rbd_pool import keyring_paths
from libvirt_rdm_backup.targets.uri import DEFAULT_RBD_OBJECT_SIZE, RbdAddress, parse_target

CONF = "/etc/ceph/ceph.conf"


def test_pool_prefix_conf_and_user() -> None:
    parsed = parse_target(f"rbd://backups/site-a?conf={CONF}&id=backup")
    assert parsed == RbdAddress(pool="backups", conf=CONF, user="backup", prefix="site-a",
                                object_size=DEFAULT_RBD_OBJECT_SIZE)
    assert isinstance(parsed, RbdAddress)
    assert parsed.uri == f"rbd://backups/site-a?conf={CONF}&id=backup"


def test_ceph_scheme_and_object_size() -> None:
    parsed = parse_target(f"ceph://rbd?conf={CONF}&id=u&object-size=4M")
    assert isinstance(parsed, RbdAddress)
    assert (parsed.pool, parsed.prefix, parsed.object_size) == ("rbd", "", 4 << 20)


@pytest.mark.parametrize("text", [
    "rbd://rbd?id=u",  # no conf
    f"rbd://rbd?conf={CONF}",  # no user
    "rbd://rbd?conf=relative.conf&id=u",
    f"rbd://rbd?conf={CONF}&id=u&key=AQBxyz",  # a key is never part of the target
    f"rbd://rbd?conf={CONF}&id=u&id=v",
    f"rbd://rbd/a/b?conf={CONF}&id=u",  # one level of prefix
    f"rbd://?conf={CONF}&id=u",
    f"rbd://rbd?conf={CONF}&id=u&object-size=3K",
    f"rbd://rbd?conf={CONF}&id=u&object-size=64M",
    f"rbd://rbd?conf=/{'a' * 4095}&id=u",  # longer than a path can be
    f"rbd://rbd?conf={CONF}%00x&id=u",
    f"rbd://rbd/x%00y?conf={CONF}&id=u",
    f"rbd://rbd/..?conf={CONF}&id=u",
    f"rbd://u@rbd?conf={CONF}&id=u",
    f"rbd://rbd/a@b?conf={CONF}&id=u",
    f"rbd://rbd?conf={CONF}&id=AQBxyz%3D%3D",
])
def test_malformed_rbd_targets_are_refused(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_target(text)
    assert "\n" not in str(err.value)
    assert "AQBxyz" not in str(err.value)


def test_keyring_named_in_the_environment_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDM_BACKUP_CEPH_KEYRING", "/root/k")
    assert keyring_paths("/etc/ceph/ceph.conf", "u", "/x") == ["/root/k"]
    monkeypatch.delenv("RDM_BACKUP_CEPH_KEYRING")
    assert keyring_paths("/srv/c/ceph.conf", "u", "/nonexistent") == \
        ["/srv/c/ceph.client.u.keyring"]
