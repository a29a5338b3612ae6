"""Declarative, read-only views of libvirt domain XML (lxml underneath).

Each class maps attributes to XPath expressions once, so no other module
needs to know where a value lives in the XML::

    disk = DiskXML(element)
    disk.target_dev      # ./target/@dev
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from lxml import etree

from libvirt_rdm_backup.errors import UsageError

T = TypeVar("T")


class XMLProperty(Generic[T]):
    """A value read from the element by an XPath (attribute or element text)."""

    def __init__(self, xpath: str, convert: Callable[[str], T] | None = None) -> None:
        self.xpath = xpath
        self.convert = convert

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> XMLProperty[T]: ...

    @overload
    def __get__(self, obj: XMLObject, owner: type[Any]) -> T | None: ...

    def __get__(self, obj: XMLObject | None, owner: type[Any]) -> Any:
        if obj is None:
            return self
        found = obj.element.xpath(self.xpath)
        if not isinstance(found, list) or not found:
            return None
        first = found[0]
        if isinstance(first, etree._Element):
            text = first.text
        elif isinstance(first, str | bytes):
            text = first.decode() if isinstance(first, bytes) else first
        else:
            text = None
        if text is None:
            return None
        text = str(text).strip()
        if self.convert is None:
            return text
        try:
            return self.convert(text)
        except ValueError as err:
            raise UsageError(f"malformed domain XML: {self.xpath} is {text[:64]!r}") from err


class XMLFlag:
    """True when the XPath finds an element (e.g. ``./readonly``)."""

    def __init__(self, xpath: str) -> None:
        self.xpath = xpath

    def __get__(self, obj: XMLObject | None, owner: type[Any]) -> Any:
        if obj is None:
            return self
        found = obj.element.xpath(self.xpath)
        return bool(found)


class XMLObject:
    """Base of the declarative views: wraps one lxml element."""

    def __init__(self, element: etree._Element) -> None:
        self.element = element

    def children(self, xpath: str) -> list[etree._Element]:
        """Elements found by ``xpath`` relative to this one."""
        found = self.element.xpath(xpath)
        if not isinstance(found, list):
            return []
        return [e for e in found if isinstance(e, etree._Element)]


class NetworkSourceXML(XMLObject):
    """A ``<source>`` that may name a network protocol, an export and its first host."""

    source_protocol = XMLProperty[str]("./source/@protocol")
    source_name = XMLProperty[str]("./source/@name")
    host_name = XMLProperty[str]("./source/host[1]/@name")
    host_port = XMLProperty[int]("./source/host[1]/@port", int)


class DiskXML(NetworkSourceXML):
    """``<disk>`` of a domain."""

    type = XMLProperty[str]("./@type")
    device_attr = XMLProperty[str]("./@device")
    driver_name = XMLProperty[str]("./driver/@name")
    driver_type = XMLProperty[str]("./driver/@type")
    source_file = XMLProperty[str]("./source/@file")
    source_dev = XMLProperty[str]("./source/@dev")
    source_dir = XMLProperty[str]("./source/@dir")
    source_pool = XMLProperty[str]("./source/@pool")
    source_volume = XMLProperty[str]("./source/@volume")
    source_mode = XMLProperty[str]("./source/@mode")
    target_dev = XMLProperty[str]("./target/@dev")
    target_bus = XMLProperty[str]("./target/@bus")
    alias = XMLProperty[str]("./alias/@name")
    serial = XMLProperty[str]("./serial")
    wwn = XMLProperty[str]("./wwn")
    readonly = XMLFlag("./readonly")
    # network disks: cephx user and libvirt secret (``<auth>`` beside or inside ``<source>``)
    auth_username = XMLProperty[str]("./auth/@username | ./source/auth/@username")
    auth_secret_uuid = XMLProperty[str]("./auth/secret/@uuid | ./source/auth/secret/@uuid")
    auth_secret_usage = XMLProperty[str]("./auth/secret/@usage | ./source/auth/secret/@usage")
    source_snapshot = XMLProperty[str]("./source/snapshot/@name")
    source_config = XMLProperty[str]("./source/config/@file")

    @property
    def hosts(self) -> list[tuple[str, int | None]]:
        """Every ``<source><host>`` as ``(name, port)`` (port None when absent)."""
        found = []
        for host in self.children("./source/host"):
            name, port = host.get("name"), host.get("port")
            if not name:
                continue
            try:
                found.append((str(name), int(port) if port else None))
            except ValueError as err:
                raise UsageError(f"malformed domain XML: host port {str(port)[:64]!r}") from err
        return found

    @property
    def device(self) -> str:
        """libvirt's device kind (``disk`` when the attribute is absent)."""
        return self.device_attr or "disk"


class HostdevXML(NetworkSourceXML):
    """``<hostdev>`` of a domain (only ``type='scsi'`` ones matter here)."""

    mode = XMLProperty[str]("./@mode")
    type = XMLProperty[str]("./@type")
    adapter = XMLProperty[str]("./source/adapter/@name")
    address_bus = XMLProperty[int]("./source/address/@bus", int)
    address_target = XMLProperty[int]("./source/address/@target", int)
    address_unit = XMLProperty[int]("./source/address/@unit", int)
    alias = XMLProperty[str]("./alias/@name")
    readonly = XMLFlag("./readonly")


class DomainXML(XMLObject):
    """``<domain>``: identity, disks and SCSI host devices."""

    name = XMLProperty[str]("./name")
    uuid = XMLProperty[str]("./uuid")
    type = XMLProperty[str]("./@type")

    @classmethod
    def parse(cls, text: str) -> DomainXML:
        """Parse domain XML text (raises UsageError on malformed XML)."""
        parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
        try:
            root = etree.fromstring(text.encode(), parser)
        except etree.XMLSyntaxError as err:
            raise UsageError(f"malformed domain XML: {err}") from err
        if root.tag != "domain":
            raise UsageError(f"not a domain XML document (root element <{root.tag}>)")
        return cls(root)

    @property
    def disks(self) -> list[DiskXML]:
        """Every ``<disk>`` in document order."""
        return [DiskXML(e) for e in self.children("./devices/disk")]

    @property
    def hostdevs(self) -> list[HostdevXML]:
        """Every ``<hostdev>`` in document order."""
        return [HostdevXML(e) for e in self.children("./devices/hostdev")]
