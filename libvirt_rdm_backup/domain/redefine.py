"""A new domain definition from a backup's domain XML, its raw disks on restored targets.

The XML comes from the repository: untrusted. It is parsed without entities,
DTDs or network access and bounded in size; it is refused when it holds anything
that would act on the host beyond defining a domain (host device passthrough,
shared host directories, QEMU command-line passthrough, character devices on
host files, sockets or devices, interface scripts). What is changed:

* ``<name>`` is the new name; ``<uuid>``, the ``id`` attribute, ``<genid>`` values,
  the UUID in ``<sysinfo>`` and every ``<seclabel>`` are removed (libvirt makes
  new ones); device ``<alias>`` elements other than user aliases (``ua-``) go;
* each raw disk of the backup points at its restored target: a raw
  ``<disk type='file'>``, a ``<disk type='block'>`` or the iSCSI LUN; a raw disk
  without a restored target is dropped with a note;
* any other disk is kept when its source exists on this host (or it has none),
  else dropped with a note;
* interfaces lose their ``<mac>`` (libvirt generates a new one) and ``<target>``
  (the host tap name); graphics get ``autoport`` with no fixed port or socket;
  a vsock gets an automatic CID; ``<nvram>`` loses its file (a new one per
  domain), an ``<emulator>`` that does not exist here is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from libvirt_rdm_backup.domain.disks import IscsiSource
from libvirt_rdm_backup.errors import UsageError

MAX_XML = 1 << 20
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEVICES = frozenset({
    "emulator", "disk", "controller", "interface", "input", "graphics", "video", "sound",
    "audio", "console", "serial", "parallel", "channel", "memballoon", "rng", "watchdog",
    "panic", "iommu", "vsock", "tpm", "hub",
})
CHARDEV_TYPES = frozenset({"pty", "null", "vc", "spicevmc", "spiceport", "qemu-vdagent",
                           "dbus", "unix"})
RNG_DEVICES = frozenset({"/dev/random", "/dev/urandom", "/dev/hwrng"})
REFUSED_INTERFACES = frozenset({"hostdev", "vhostuser", "ethernet", "vdpa"})


@dataclass(frozen=True)
class RestoredTarget:
    """Where a raw disk was restored: ``file`` or ``block`` path, an iSCSI LUN, or ``rbd``:
    the RBD image the disk's source names."""

    kind: str
    path: str
    iscsi: IscsiSource | None = None


def _refuse(what: str) -> UsageError:
    return UsageError(f"the backup's domain XML {what}; define that domain by hand")


def parse_untrusted(text: str) -> etree._Element:
    """The ``<domain>`` element of untrusted XML: bounded, no DTD, entities or network."""
    if len(text.encode("utf-8", "surrogateescape")) > MAX_XML:
        raise _refuse(f"is longer than {MAX_XML} bytes")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                             load_dtd=False, remove_comments=True, remove_pis=True)
    try:
        root = etree.fromstring(text.encode("utf-8", "surrogateescape"), parser)
    except (etree.XMLSyntaxError, ValueError) as err:
        raise UsageError(f"the backup's domain XML is malformed: {err}") from err
    if root.getroottree().docinfo.doctype:  # type: ignore[union-attr]
        raise _refuse("has a document type declaration")
    if any(isinstance(node, etree._Entity) for node in root.iter()):
        raise _refuse("uses entities")
    if root.tag != "domain":
        raise _refuse(f"is not a domain (root element <{str(root.tag)[:32]}>)")
    return root


def redefined_xml(text: str, name: str, targets: dict[str, RestoredTarget],
                  exists: Callable[[str], bool] = os.path.exists) -> tuple[str, list[str]]:
    """The new domain's XML and notes on what was dropped (UsageError when refused)."""
    root = parse_untrusted(text)
    notes: list[str] = []
    _refuse_host_actions(root)
    _new_identity(root, name)
    devices = root.find("devices")
    if devices is not None:
        for disk in devices.findall("disk"):
            _place_disk(devices, disk, targets, exists, notes)
        _host_specific(root, devices, exists)
    return etree.tostring(root, encoding="unicode"), notes


def _refuse_host_actions(root: etree._Element) -> None:
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith(f"{{{QEMU_NS}}}"):
            raise _refuse("passes arguments to QEMU (qemu: namespace)")
    devices = root.find("devices")
    for device in devices if devices is not None else []:
        if isinstance(device.tag, str):
            _check_device(device)
    os_element = root.find("os")
    for tag in ("kernel", "initrd", "dtb"):
        booted = os_element.find(tag) if os_element is not None else None
        if booted is not None and booted.text and not os.path.exists(booted.text.strip()):
            raise _refuse(f"boots a <{tag}> that is not on this host")


def _check_device(device: etree._Element) -> None:
    """Refuse a device that acts on the host; forget the old domain's socket paths."""
    if device.tag not in DEVICES:
        raise _refuse(f"has a <{device.tag[:32]}> device")
    if device.tag in ("console", "serial", "parallel", "channel") \
            and device.get("type", "pty") not in CHARDEV_TYPES:
        raise _refuse(f"has a <{device.tag}> on the host's {device.get('type')}")
    if device.tag == "interface" and (device.get("type") in REFUSED_INTERFACES
                                      or device.find("script") is not None):
        raise _refuse(f"has an <interface type='{device.get('type')}'>")
    if device.tag == "tpm" and device.find("backend[@type='passthrough']") is not None:
        raise _refuse("passes a host TPM through")
    if device.tag == "rng":
        backend = device.find("backend")
        if backend is not None and backend.get("model") == "random" \
                and (backend.text or "/dev/urandom").strip() not in RNG_DEVICES:
            raise _refuse("reads randomness from a host file")
        if backend is not None and backend.get("model") == "egd" \
                and backend.get("type") not in CHARDEV_TYPES:
            raise _refuse("has an rng on a host character device")
    if device.tag in ("console", "serial", "parallel", "channel"):
        device.attrib.pop("tty", "")  # the old domain's pty
    for source in device.iter("source"):
        if source.get("path") and device.tag != "disk":
            source.attrib.pop("path")  # a unix socket or pty of the old domain: libvirt makes one


def _new_identity(root: etree._Element, name: str) -> None:
    root.attrib.pop("id", "")
    found = root.find("name")
    element = found if found is not None else etree.SubElement(root, "name")
    element.text = name
    for path in ("uuid", "genid", "sysinfo/system/entry[@name='uuid']"):
        for found in root.findall(path):
            parent = found.getparent()
            if parent is not None:
                parent.remove(found)
    for element in [*root.iter("seclabel"), *root.iter("alias")]:
        if element.tag == "alias" and (element.get("name") or "").startswith("ua-"):
            continue
        parent = element.getparent()
        if parent is not None:
            parent.remove(element)


def _disk_source(disk: etree._Element) -> str | None:
    source = disk.find("source")
    if source is None:
        return None
    for key in ("file", "dev", "dir"):
        if source.get(key):
            return str(source.get(key))
    return "" if source.get("protocol") or source.get("pool") else None


def _place_disk(devices: etree._Element, disk: etree._Element,
                targets: dict[str, RestoredTarget], exists: Callable[[str], bool],
                notes: list[str]) -> None:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else None
    if dev in targets:
        _point_at(disk, targets[str(dev)])
        return
    driver = disk.find("driver")
    raw = disk.get("device") == "lun" or (
        disk.get("type") in ("block", "network", "volume")
        and (driver.get("type") if driver is not None else "raw") == "raw")
    source = _disk_source(disk)
    if raw:
        notes.append(f"disk {dev} is not in the backup: left out")
    elif source == "":
        notes.append(f"disk {dev} is on a network or pool volume this tool cannot check: "
                     "left out")
    elif source is not None and not exists(source):
        notes.append(f"disk {dev}: {source} is not on this host: left out")
    else:
        return
    devices.remove(disk)


def _point_at(disk: etree._Element, where: RestoredTarget) -> None:
    if where.kind == "rbd":  # written back into the very image its <source> names
        return
    old = disk.find("source")
    keep = [e for e in (old if old is not None else []) if e.tag in ("auth", "initiator")]
    if old is not None:
        disk.remove(old)
    source = etree.Element("source")
    if where.kind == "iscsi" and where.iscsi is not None:
        disk.set("type", "network")
        source.set("protocol", "iscsi")
        source.set("name", f"{where.iscsi.iqn}/{where.iscsi.lun}")
        etree.SubElement(source, "host", name=where.iscsi.host, port=str(where.iscsi.port))
        source.extend(keep)
    elif where.kind == "block":
        disk.set("type", "block")
        source.set("dev", where.path)
    else:
        disk.set("type", "file")
        if disk.get("device") == "lun":
            disk.set("device", "disk")  # SCSI passthrough needs a device
        source.set("file", where.path)
    driver = disk.find("driver")
    if driver is None:
        driver = etree.SubElement(disk, "driver", name="qemu")
    driver.set("type", "raw")
    disk.insert(list(disk).index(driver) + 1, source)


def _host_specific(root: etree._Element, devices: etree._Element,
                   exists: Callable[[str], bool]) -> None:
    for interface in devices.findall("interface"):
        for tag in ("mac", "target"):
            for element in interface.findall(tag):
                interface.remove(element)
    for graphics in devices.findall("graphics"):
        for key in ("port", "tlsPort", "websocket", "socket"):
            graphics.attrib.pop(key, "")
        if graphics.get("type") in ("vnc", "spice"):
            graphics.set("autoport", "yes")
        for listen in graphics.findall("listen"):
            listen.attrib.pop("socket", "")
    for cid in devices.findall("vsock/cid"):
        cid.attrib.pop("address", "")
        cid.set("auto", "yes")
    for nvram in root.findall("os/nvram"):
        nvram.text = None
    for emulator in devices.findall("emulator"):
        if not exists((emulator.text or "").strip()):
            devices.remove(emulator)
