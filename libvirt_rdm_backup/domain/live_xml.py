"""Domain XML for a live restore: disks switched onto overlays, block copy destinations.

The persistent definition is never changed: :func:`live_definition` returns the XML the
domain is started from once (``virDomainCreateXML`` of a defined, shut-off domain of the
same name and UUID starts it with that live definition and keeps the persistent one for
its next start). Each restored disk becomes a qcow2 overlay in a private directory whose
backing store is the backup point, served read-only over NBD on a unix socket; I/O errors
stop the guest (``error_policy``/``rerror_policy`` ``stop``) instead of reaching it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from libvirt_rdm_backup.errors import UsageError

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=False)
SOURCE_KINDS = ("block", "network", "volume")


@dataclass(frozen=True)
class Overlay:
    """Where a restored disk reads from while its data flows back."""

    disk: str  # target dev
    path: str  # the qcow2 overlay file
    socket: str  # unix socket of the NBD server serving the point
    export: str  # NBD export name of the point


def parse(text: str) -> etree._Element:
    """The root element of domain XML (UsageError when unreadable)."""
    try:
        return etree.fromstring(text.encode(), _PARSER)
    except etree.XMLSyntaxError as err:
        raise UsageError(f"cannot parse domain XML: {err}") from err


def disk_element(root: etree._Element, disk: str) -> etree._Element:
    """The ``<disk>`` whose target is ``disk`` (UsageError when there is none)."""
    for element in root.iterfind("devices/disk"):
        target = element.find("target")
        if target is not None and target.get("dev") == disk:
            return element
    raise UsageError(f"the domain has no disk {disk!r}")


def check_restorable(element: etree._Element, disk: str) -> None:
    """Refuse a disk QEMU's block layer cannot run on an overlay (UsageError)."""
    if element.get("device", "disk") != "disk":
        raise UsageError(f"disk {disk} is device='{element.get('device')}' (SCSI commands "
                         "pass through to the storage): it cannot run from a backup")
    if element.get("type") not in SOURCE_KINDS:
        raise UsageError(f"disk {disk} is type='{element.get('type')}', not a raw disk")
    driver = element.find("driver")
    if driver is not None and driver.get("type", "raw") != "raw":
        raise UsageError(f"disk {disk} is not raw (driver type {driver.get('type')})")


def copy_destination(element: etree._Element) -> str:
    """``virDomainBlockCopy`` destination XML: the disk's own source, written raw."""
    dest = etree.Element("disk", type=element.get("type", "block"))
    etree.SubElement(dest, "driver", type="raw")
    source = element.find("source")
    if source is None:
        raise UsageError("a disk without a source cannot be restored")
    dest.append(_copy(source))
    return etree.tostring(dest, encoding="unicode")


def switch_to_overlay(element: etree._Element, overlay: Overlay) -> None:
    """Make ``element`` read ``overlay``: a qcow2 file backed by the NBD export, I/O errors
    stopping the guest."""
    element.set("type", "file")
    driver = element.find("driver")
    if driver is None:
        driver = etree.Element("driver", name="qemu")
        element.insert(0, driver)
    driver.set("type", "qcow2")
    driver.set("error_policy", "stop")
    driver.set("rerror_policy", "stop")
    for child in element.findall("source") + element.findall("backingStore"):
        element.remove(child)
    index = list(element).index(driver) + 1
    source = etree.Element("source", file=overlay.path)
    backing = etree.Element("backingStore", type="network")
    etree.SubElement(backing, "format", type="raw")
    nbd = etree.SubElement(backing, "source", protocol="nbd", name=overlay.export)
    etree.SubElement(nbd, "host", transport="unix", socket=overlay.socket)
    etree.SubElement(backing, "backingStore")
    element.insert(index, source)
    element.insert(index + 1, backing)


def live_definition(persistent: str, overlays: list[Overlay]) -> str:
    """The persistent XML with each overlay's disk switched onto it."""
    root = parse(persistent)
    for overlay in overlays:
        switch_to_overlay(disk_element(root, overlay.disk), overlay)
    return etree.tostring(root, encoding="unicode")


def disk_source_file(live: str, disk: str) -> str | None:
    """The file a running domain's disk reads (None: not a file, or no such disk)."""
    try:
        element = disk_element(parse(live), disk)
    except UsageError:
        return None
    source = element.find("source")
    return source.get("file") if element.get("type") == "file" and source is not None else None


def dac_owner(capabilities: str, virt_type: str) -> tuple[int, int] | None:
    """uid and gid QEMU runs as (the DAC base label of ``virt_type`` in the host
    capabilities); None when libvirt names none."""
    root = parse(capabilities)
    for model in root.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") == virt_type and label.text:
                user, _, group = label.text.strip().partition(":")
                try:
                    return int(user.lstrip("+")), int(group.lstrip("+"))
                except ValueError:
                    return None
    return None


def _copy(element: etree._Element) -> etree._Element:
    return etree.fromstring(etree.tostring(element), _PARSER)
