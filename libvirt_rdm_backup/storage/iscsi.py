"""Mapping iSCSI LUNs that QEMU's own initiator attaches (``<source protocol='iscsi'>``).

:class:`IscsiAgent` asks the LUN itself who it is with the libiscsi-bin tools
(standard INQUIRY, VPD 0x80 unit serial, READ CAPACITY(16)) and, for the VPD 0x83
designators, with the system libiscsi through :mod:`.libiscsi`; when the portal
is a local tgtd it adds the LUN's backing store below it.

The parsers are pure functions over the LUN's answers. :func:`parse_vpd83_page`
decodes the raw VPD 0x83 page, so binary designators (NAA, EUI-64) arrive whole.
When libiscsi cannot be loaded, or its INQUIRY fails, the agent falls back to
``iscsi-inq``, which prints binary designators as C strings: the value stops at
the first zero byte.
:func:`parse_designators` therefore records the printed bytes as hex and says
whether they are ``complete`` (the length an NAA or EUI-64 designator of that
kind must have); only complete values identify a LUN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk
from libvirt_rdm_backup.errors import CommandError, OperationError, StorageError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import libiscsi, tgt, tgt_rbd
from libvirt_rdm_backup.storage.base import Extent, StorageNode
from libvirt_rdm_backup.storage.sysfs import SysfsAgent
from libvirt_rdm_backup.storage.tgt import is_loopback_host as is_loopback_host

DEFAULT_TIMEOUT = 60.0

DESIGNATOR_TYPES = {
    0: "vendor-specific",
    1: "t10-vendor-id",
    2: "eui-64",
    3: "naa",
    4: "relative-target-port",
    5: "target-port-group",
    6: "logical-unit-group",
    7: "md5-logical-unit",
    8: "scsi-name-string",
}
CODE_SETS = {1: "binary", 2: "ascii", 3: "utf-8"}
ASSOCIATIONS = {0: "logical-unit", 1: "target-port", 2: "target-device"}
_NAA_LENGTHS = {2: 8, 3: 8, 5: 8, 6: 16}
VPD_DEVICE_IDENTIFICATION = 0x83
_CODED_RE = re.compile(r"^\((\d+)\)\s*(.*)$")
_SERIAL_RE = re.compile(r"^Unit Serial Number:\[(.*)\]\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Designator:
    """One VPD 0x83 designator: codes as the LUN sent them, value as text or hex."""

    type_code: int
    code_set: int
    association: int
    piv: bool
    value: str | None = None  # text designators (ASCII, UTF-8)
    value_hex: str | None = None  # binary designators (iscsi-inq: up to a zero byte)
    complete: bool = True

    @property
    def type(self) -> str:
        """Designator type name (``naa``, ``t10-vendor-id``, ...)."""
        return DESIGNATOR_TYPES.get(self.type_code, f"type-{self.type_code}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data: dict[str, Any] = {
            "type": self.type,
            "type_code": self.type_code,
            "code_set": CODE_SETS.get(self.code_set, f"code-set-{self.code_set}"),
            "association": ASSOCIATIONS.get(self.association, f"assoc-{self.association}"),
            "piv": self.piv,
            "complete": self.complete,
        }
        if self.value is not None:
            data["value"] = self.value
        if self.value_hex is not None:
            data["value_hex"] = self.value_hex
        return data


@dataclass(frozen=True)
class ReadCapacity:
    """READ CAPACITY(16) data: size is ``(last_lba + 1) * block_size``."""

    last_lba: int
    block_size: int
    lbppb_exponent: int = 0
    lbpme: bool = False

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return (self.last_lba + 1) * self.block_size

    @property
    def physical_block_size(self) -> int:
        """Physical block size (logical blocks per physical block times the block size)."""
        return self.block_size << self.lbppb_exponent


def _fields(text: str) -> dict[str, str]:
    """``Key:value`` lines (first occurrence of each key wins)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in found:
            found[key.strip()] = value
    return found


def parse_standard_inquiry(text: str) -> dict[str, str]:
    """Vendor, product, revision and device type from ``iscsi-inq URL``."""
    fields = _fields(text)
    found = {
        "vendor": fields.get("Vendor", "").strip(),
        "product": fields.get("Product", "").strip(),
        "revision": fields.get("Revision", "").strip(),
        "device_type": fields.get("Peripheral Device Type", "").strip(),
    }
    return {key: value for key, value in found.items() if value}


def parse_unit_serial(text: str) -> str | None:
    """The unit serial number from ``iscsi-inq -e 1 -c 128 URL`` (padding stripped)."""
    match = _SERIAL_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip() or None


def _coded(value: str) -> int:
    """The number of a ``(N) NAME`` field."""
    match = _CODED_RE.match(value.strip())
    if match is None:
        raise ValueError(f"unexpected field value {value!r}")
    return int(match.group(1))


def _expected_length(type_code: int, raw: bytes) -> int | None:
    if type_code == 3 and raw:
        return _NAA_LENGTHS.get(raw[0] >> 4)
    return None


def _parse_designator_block(block: str) -> Designator:
    head, sep, rest = block.partition("Designator:[")
    if not sep:
        raise ValueError("designator block without a value")
    text_value = rest[: rest.rfind("]")] if "]" in rest else rest.rstrip("\n")
    fields = _fields(head)
    type_code = _coded(fields["Designator Type"])
    code_set = _coded(fields["Code Set"])
    association = _coded(fields["Association"])
    piv = fields.get("PIV", "0").strip() == "1"
    if code_set in (2, 3):
        return Designator(type_code, code_set, association, piv, value=text_value.strip())
    raw = text_value.encode("utf-8", "surrogateescape")
    expected = _expected_length(type_code, raw)
    return Designator(
        type_code, code_set, association, piv, value_hex=raw.hex(), complete=expected == len(raw)
    )


def parse_designators(text: str) -> list[Designator]:
    """VPD 0x83 designators from ``iscsi-inq -e 1 -c 131 URL``.

    Blocks are split on the ``DEVICE DESIGNATOR #n`` headings and each value runs to
    the last ``]`` of its block, so binary values holding newlines or brackets survive.
    """
    blocks = re.split(r"^DEVICE DESIGNATOR #\d+\s*$", text, flags=re.MULTILINE)[1:]
    return [_parse_designator_block(block) for block in blocks]


def _designator_text(raw: bytes, code_set: int) -> str:
    """An ASCII or UTF-8 designator without the NUL or space padding after it."""
    return raw.decode("utf-8" if code_set == 3 else "ascii", "replace").rstrip("\x00").strip()


def parse_vpd83_page(page: bytes) -> list[Designator]:
    """Designators of a raw VPD 0x83 (device identification) page, header included.

    Each descriptor is a 4-byte header (protocol identifier and code set; PIV,
    association and designator type; reserved; designator length) and its value.
    Binary values are kept whole as hex; a descriptor cut short by the end of the
    page is kept with ``complete=False``.
    """
    if len(page) < 4 or page[1] != VPD_DEVICE_IDENTIFICATION:
        raise ValueError(f"not a VPD 0x83 page: {page[:4].hex()!r}")
    end = min(len(page), 4 + int.from_bytes(page[2:4], "big"))
    designators: list[Designator] = []
    offset = 4
    while offset + 4 <= end:
        code_set = page[offset] & 0x0F
        piv = bool(page[offset + 1] & 0x80)
        association = (page[offset + 1] >> 4) & 0x03
        type_code = page[offset + 1] & 0x0F
        length = page[offset + 3]
        raw = page[offset + 4 : offset + 4 + length]
        complete = len(raw) == length
        if code_set in (2, 3):
            value = _designator_text(raw, code_set)
            designators.append(
                Designator(type_code, code_set, association, piv, value=value, complete=complete)
            )
        else:
            designators.append(
                Designator(
                    type_code, code_set, association, piv, value_hex=raw.hex(), complete=complete
                )
            )
        offset += 4 + length
    return designators


def parse_readcapacity16(text: str) -> ReadCapacity:
    """Last LBA and block size from ``iscsi-readcapacity16 URL``."""
    fields = _fields(text)
    try:
        last_lba = int(fields["RETURNED LOGICAL BLOCK ADDRESS"])
        block_size = int(fields["LOGICAL BLOCK LENGTH IN BYTES"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"unexpected iscsi-readcapacity16 output: {text.strip()!r}") from err
    exponent = re.search(r"LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:(\d+)", text)
    lbpme = re.search(r"LBPME:(\d+)", text)
    return ReadCapacity(
        last_lba=last_lba,
        block_size=block_size,
        lbppb_exponent=int(exponent.group(1)) if exponent else 0,
        lbpme=bool(lbpme and lbpme.group(1) == "1"),
    )


class IscsiAgent:
    """Maps disks that QEMU reaches over iSCSI: the LUN's identity, and tgtd backing stores."""

    name = "iscsi"

    def __init__(
        self,
        sysfs: SysfsAgent | None = None,
        use_local_tgt: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        use_libiscsi: bool = True,
    ) -> None:
        self.sysfs = sysfs or SysfsAgent()
        self.use_local_tgt = use_local_tgt
        self.timeout = timeout
        self.use_libiscsi = use_libiscsi

    def can_map(self, disk: RawDisk) -> bool:
        """True for disks with an iSCSI source."""
        return disk.iscsi is not None

    def map(self, disk: RawDisk) -> StorageNode:
        """The LUN behind ``disk`` with its identity and, for a local tgtd, its backing store."""
        if disk.iscsi is None:
            raise StorageError(f"disk {disk.target} has no iSCSI source")
        return self.map_lun(disk.iscsi)

    def map_lun(self, source: IscsiSource) -> StorageNode:
        """The storage tree of one iSCSI LUN."""
        url = source.url
        identity: dict[str, Any] = {
            "portal": source.portal,
            "iqn": source.iqn,
            "lun": source.lun,
            "url": url,
        }
        identity.update(parse_standard_inquiry(self._tool(["iscsi-inq", url])))
        capacity = self._capacity(url)
        identity.update(
            size=capacity.size,
            logical_block_size=capacity.block_size,
            physical_block_size=capacity.physical_block_size,
        )
        identity.update(self._vpd_identity(url))
        node = StorageNode(
            kind="iscsi-lun",
            name=f"{source.iqn}/{source.lun}",
            path=url,
            size=capacity.size,
            identity=identity,
        )
        if self.use_local_tgt and is_loopback_host(source.host):
            self._add_tgt_backing(node, source)
        return node

    def _tool(self, argv: list[str]) -> str:
        """Run a libiscsi tool; missing tools and undecodable output become StorageError."""
        try:
            return run(argv, timeout=self.timeout).stdout
        except CommandError:
            raise
        except OperationError as err:
            raise StorageError(f"cannot ask the iSCSI LUN: {err}") from err
        except UnicodeDecodeError as err:
            raise StorageError(f"{argv[0]} printed undecodable output: {err}") from err

    def _capacity(self, url: str) -> ReadCapacity:
        text = self._tool(["iscsi-readcapacity16", url])
        try:
            return parse_readcapacity16(text)
        except ValueError as err:
            raise StorageError(str(err)) from err

    def _vpd_identity(self, url: str) -> dict[str, Any]:
        """Serial and designators; a LUN without these VPD pages just lacks the keys."""
        found: dict[str, Any] = {}
        try:
            serial = parse_unit_serial(self._tool(["iscsi-inq", "-e", "1", "-c", "128", url]))
        except (CommandError, StorageError):
            serial = None
        if serial is not None:
            found["serial"] = serial
        designators, source = self._designators(url)
        if designators:
            found["designators"] = [d.to_dict() for d in designators]
            found["designator_source"] = source
            found.update(_designator_summary(designators))
        return found

    def _designators(self, url: str) -> tuple[list[Designator], str]:
        """VPD 0x83 designators: whole from libiscsi when it loads, else from iscsi-inq."""
        library = libiscsi.load() if self.use_libiscsi else None
        if library is not None:
            try:
                page = library.inquiry_vpd(url, VPD_DEVICE_IDENTIFICATION, self.timeout)
                return parse_vpd83_page(page), "libiscsi"
            except (StorageError, ValueError):
                pass  # iscsi-inq below: it may still get the text designators
        try:
            text = self._tool(["iscsi-inq", "-e", "1", "-c", "131", url])
            return parse_designators(text), "iscsi-inq"
        except (CommandError, StorageError, KeyError, ValueError):
            return [], "iscsi-inq"

    def _add_tgt_backing(self, node: StorageNode, source: IscsiSource) -> None:
        """Below a LUN of a local tgtd: its backing store (file, mapped block device, or
        the RBD image of an rbd backing store)."""
        if not tgt.tgtadm_available():
            return
        lun = tgt.find_lun(source.iqn, source.lun)
        if lun is None:
            return
        node.identity["tgt"] = {
            "scsi_id": lun.scsi_id,
            "scsi_sn": lun.scsi_sn,
            "readonly": lun.readonly,
            "backing_store_type": lun.backing_store_type,
            "backing_store_path": lun.backing_store_path,
        }
        if lun.backing_store_type == tgt_rbd.BACKING_STORE and lun.backing_store_path:
            target = tgt_rbd.backing_node(lun, node.size)
            node.extents.append(Extent(0, node.size or 0, 0, target))
        elif lun.backing_store_path:
            target = self.sysfs.map_backing(lun.backing_store_path)
            node.extents.append(Extent(0, node.size or 0, 0, target))


def _designator_summary(designators: list[Designator]) -> dict[str, Any]:
    """Convenience keys: ``naa`` and ``t10_vendor_id``.

    ``naa`` lists the complete NAA values (hex) that name the logical unit itself;
    NAA designators of a target port or target device are left out.
    """
    summary: dict[str, Any] = {}
    naa = [
        d.value_hex
        for d in designators
        if d.type_code == 3 and d.association == 0 and d.complete and d.value_hex
    ]
    if naa:
        summary["naa"] = naa
    vendor_ids = [d.value for d in designators if d.type_code == 1 and d.value]
    if vendor_ids:
        summary["t10_vendor_id"] = vendor_ids[0]
    return summary
