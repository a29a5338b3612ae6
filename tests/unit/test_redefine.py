"""A new domain from a backup's domain XML: raw disks on the restored targets, host-specific
identity removed, anything that would act on the host refused."""

from __future__ import annotations

import pytest
from lxml import etree

from libvirt_rdm_backup.domain.disks import IscsiSource
from libvirt_rdm_backup.domain.redefine import MAX_XML, RestoredTarget, redefined_xml
from libvirt_rdm_backup.errors import UsageError

LIVE = """<domain type='kvm' id='7'>
  <name>vm1</name>
  <uuid>6f0c9e4e-1111-2222-3333-444455556666</uuid>
  <genid>0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f</genid>
  <memory unit='KiB'>65536</memory>
  <sysinfo type='smbios'><system><entry name='uuid'>6f0c9e4e-1111-2222-3333-444455556666</entry>
  <entry name='product'>x</entry></system></sysinfo>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/nonexistent/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/present/system.qcow2'/><target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/gone/data.qcow2'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/loop3'><seclabel model='dac' relabel='no'/></source>
      <target dev='vdb' bus='virtio'/><serial>RDMBLOOP1</serial><alias name='ua-data'/></disk>
    <disk type='network' device='lun'><driver name='qemu' type='raw'/>
      <source protocol='iscsi' name='iqn.2026-11.org.x:t1/1'><host name='10.0.0.9' port='3260'/>
      <auth username='u'><secret type='iscsi' usage='x'/></auth></source>
      <target dev='sda' bus='scsi'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/sdz'/><target dev='vde' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/>
      <target dev='vnet3'/><model type='virtio'/></interface>
    <graphics type='vnc' port='5903' autoport='no' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/></graphics>
    <console type='pty' tty='/dev/pts/4'><source path='/dev/pts/4'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/x.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <vsock model='virtio'><cid auto='no' address='3'/></vsock>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-6f0c</label></seclabel>
</domain>"""


def new(text: str = LIVE, targets: dict[str, RestoredTarget] | None = None
        ) -> tuple[etree._Element, list[str]]:
    targets = targets if targets is not None else {
        "vdb": RestoredTarget("file", "/restore/vdb.raw"),
        "sda": RestoredTarget("file", "/restore/sda.raw"),
    }
    xml, notes = redefined_xml(text, "vm1-restored", targets,
                               exists=lambda p: p.startswith("/present/"))
    return etree.fromstring(xml.encode()), notes


def disk_of(root: etree._Element, dev: str) -> etree._Element | None:
    found = root.xpath(f"devices/disk[target/@dev='{dev}']")
    assert isinstance(found, list)
    return found[0] if found and isinstance(found[0], etree._Element) else None


def test_the_new_domain_has_a_new_name_and_no_old_identity() -> None:
    root, _ = new()
    assert root.findtext("name") == "vm1-restored"
    assert root.get("id") is None
    for path in ("uuid", "genid", ".//seclabel", "sysinfo/system/entry[@name='uuid']",
                 "devices/interface/mac", "devices/interface/target", "devices/emulator"):
        assert root.find(path) is None, path
    assert root.findtext("sysinfo/system/entry[@name='product']") == "x"
    assert root.find("os/nvram").text is None  # type: ignore[union-attr]
    assert root.find("os/nvram").get("template")  # type: ignore[union-attr]
    assert [a.get("name") for a in root.iter("alias")] == ["ua-data"]


def test_raw_disks_point_at_the_restored_files() -> None:
    root, _ = new()
    for dev in ("vdb", "sda"):
        disk = disk_of(root, dev)
        assert disk is not None
        assert disk.get("type") == "file" and disk.get("device") == "disk"
        assert disk.find("source").attrib == {"file": f"/restore/{dev}.raw"}  # type: ignore
        assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    vdb = disk_of(root, "vdb")
    assert vdb is not None and vdb.findtext("serial") == "RDMBLOOP1"


def test_raw_disks_go_back_to_their_original_devices() -> None:
    lun = IscsiSource("127.0.0.1", 3260, "iqn.2026-11.org.x:t1", 1)
    root, _ = new(targets={"vdb": RestoredTarget("block", "/dev/loop9"),
                           "sda": RestoredTarget("iscsi", lun.url, lun)})
    vdb = disk_of(root, "vdb")
    assert vdb is not None and vdb.get("type") == "block"
    assert vdb.find("source").attrib == {"dev": "/dev/loop9"}  # type: ignore[union-attr]
    sda = disk_of(root, "sda")
    assert sda is not None and sda.get("type") == "network" and sda.get("device") == "lun"
    source = sda.find("source")
    assert source is not None and source.get("name") == "iqn.2026-11.org.x:t1/1"
    assert source.find("host").attrib == {"name": "127.0.0.1", "port": "3260"}  # type: ignore
    assert source.find("auth") is not None


def test_other_disks_stay_only_when_they_are_on_this_host() -> None:
    root, notes = new()
    assert [d.findtext("target") or d.find("target").get("dev")  # type: ignore[union-attr]
            for d in root.iter("disk")] == ["vda", "vdb", "sda"]
    assert notes == ["disk vdc: /gone/data.qcow2 is not on this host: left out",
                     "disk vde is not in the backup: left out"]


def test_ports_sockets_and_cids_of_the_old_domain_are_left_to_libvirt() -> None:
    root, _ = new()
    graphics = root.find("devices/graphics")
    assert graphics is not None and graphics.get("port") is None
    assert graphics.get("autoport") == "yes"
    assert root.find("devices/channel/source").get("path") is None  # type: ignore[union-attr]
    console = root.find("devices/console")
    assert console is not None and console.get("tty") is None
    assert console.find("source").get("path") is None  # type: ignore[union-attr]
    assert root.find("devices/vsock/cid").attrib == {"auto": "yes"}  # type: ignore[union-attr]


@pytest.mark.parametrize(("change", "words"), [
    pytest.param(("<devices>", "<devices><hostdev mode='subsystem' type='pci'/>"),
                 "has a <hostdev> device", id="hostdev"),
    pytest.param(("<devices>", "<devices><filesystem type='mount'><source dir='/'/>"
                               "<target dir='r'/></filesystem>"),
                 "has a <filesystem> device", id="filesystem"),
    pytest.param(("</domain>", "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/"
                               "domain/qemu/1.0'><qemu:arg value='-x'/></qemu:commandline>"
                               "</domain>"), "passes arguments to QEMU", id="qemu-commandline"),
    pytest.param(("<devices>", "<devices><serial type='file'><source path='/etc/x'/></serial>"),
                 "has a <serial> on the host's file", id="serial-file"),
    pytest.param(("<devices>", "<devices><interface type='ethernet'><script path='/x'/>"
                               "</interface>"), "has an <interface type='ethernet'>",
                 id="interface-script"),
    pytest.param(("<devices>", "<devices><rng model='virtio'><backend model='random'>/etc/"
                               "shadow</backend></rng>"), "reads randomness from a host file",
                 id="rng-file"),
    pytest.param(("<os>", "<os><kernel>/nonexistent/vmlinuz</kernel>"),
                 "boots a <kernel> that is not on this host", id="missing-kernel"),
    pytest.param(("<domain type='kvm' id='7'>",
                  "<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
                  "<domain type='kvm' id='7'>"), "document type declaration", id="entity"),
    pytest.param(("<domain type='kvm' id='7'>", "<network>"), "malformed", id="not-xml"),
])
def test_xml_that_acts_on_the_host_is_refused(change: tuple[str, str], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        new(LIVE.replace(*change, 1))


def test_oversized_xml_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(UsageError, match="longer than"):
        new(LIVE.replace("<devices>", "<devices>" + "<!--x-->" * (MAX_XML // 8 + 1), 1))


def test_a_document_that_is_not_a_domain_is_refused() -> None:
    with pytest.raises(UsageError, match="is not a domain"):
        new("<network><name>x</name></network>")
