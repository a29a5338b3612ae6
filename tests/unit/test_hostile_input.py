"""Hostile input: every parser returns a valid object or raises the project's own errors.

Each parser of untrusted text (target URIs, domain XML, manifests, chunk maps,
NBD volume superblocks, agent requests, agent addresses, names used as paths,
the command line) is fed random and mutated input. The only exceptions allowed
out are :class:`RdmBackupError` subclasses, or what the parser documents
(``RawDiskMapping.from_dict``: KeyError/TypeError/ValueError;
``Superblock.from_bytes``: None).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from libvirt_rdm_backup.agent import disk_from_request, handle
from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import DiskInventory, RawDisk, SourceKind
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.errors import RepositoryError, UsageError
from libvirt_rdm_backup.remote import AgentAddress, parse_agent_uri
from libvirt_rdm_backup.repository.chunks import ChunkMap, chunk_digest
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.ids import check_backup_id, check_safe_name, new_backup_id
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST, DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.storage.base import Extent, RawDiskMapping, StorageNode
from libvirt_rdm_backup.targets.uri import NbdAddress, parse_target
from libvirt_rdm_backup.targets.volume_format import SLOT, Superblock

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIGHT = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"

# -- building blocks ----------------------------------------------------------------------

HOSTILE_PIECES = [
    "", "/", "//", "..", "../", "../../etc/passwd", "%2e%2e%2f", "%2F", "%00", "\x00", "\n",
    "\r\n", "\t", " ", "$", "$(id)", "`id`", ";", "|", "&", "&&", "'", '"', "\\", "?", "#",
    "@", ":", "::", "[", "]", "[::1]", "[::1", "[fe80::1%25eth0]", "127.0.0.1", "localhost",
    "example.com", ":0", ":1", ":10809", ":65535", ":65536", ":99999999999", ":-1", ":abc",
    "?socket=", "?socket=/tmp/s", "?socket=rel", "&socket=/x", "=", "user:pw@", "é", "ﬀ",
    "\u2100", "\uff0f", "％", "x" * 200, "a", "disk0", "-", ".", "_",
]
SCHEMES = ["nbd://", "nbds://", "nbd+unix://", "nbd+unix:///", "file://", "file:///", "http://",
           "NBD://", "nbd:/", "ssh://", "", "://"]

piece = st.sampled_from(HOSTILE_PIECES) | st.text(max_size=12)
url_ish = st.builds(lambda scheme, parts: scheme + "".join(parts),
                    st.sampled_from(SCHEMES), st.lists(piece, max_size=7))

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=20))
json_trees = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=25)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutations(document: Any) -> st.SearchStrategy[Any]:
    """A strategy of ``document`` with a few keys dropped or values replaced (any depth)."""

    def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield (*prefix, key)
                yield from paths(item, (*prefix, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield (*prefix, index)
                yield from paths(item, (*prefix, index))

    all_paths = list(paths(document))
    replacement: st.SearchStrategy[Any] = (json_trees | st.sampled_from(
        [float("inf"), float("-inf"), float("nan"), 10**400, -1, 2**64, "", "../x", [], {},
         True, None, "Infinity", nested(50)]))
    edit = st.tuples(st.sampled_from(all_paths), st.sampled_from(["drop", "set"]), replacement)

    def apply(edits: list[tuple[tuple[Any, ...], str, Any]]) -> Any:
        result = copy.deepcopy(document)
        for path, action, value in edits:
            parent = result
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if action == "drop" and isinstance(parent, dict):
                    del parent[path[-1]]
                elif isinstance(parent, dict | list):
                    parent[path[-1]] = copy.deepcopy(value)  # never a shared sample object
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit changed the shape
        return result

    return st.lists(edit, min_size=1, max_size=4).map(apply)


# -- targets ------------------------------------------------------------------------------


def check_target(text: str) -> None:
    try:
        parsed = parse_target(text)
    except UsageError:
        return
    if isinstance(parsed, str):
        assert parsed and "\x00" not in parsed and "\n" not in parsed
        return
    assert isinstance(parsed, NbdAddress)
    assert parsed.export and "/" not in parsed.export and ".." not in parsed.export
    assert 1 <= parsed.port <= 65535 or parsed.socket is not None
    if parsed.socket is not None:
        assert parsed.socket.startswith("/")
    else:
        assert parsed.host
        assert parsed.tls or parsed.is_loopback  # plain NBD only to loopback by default
    assert isinstance(parsed.uri, str)


@FUZZ
@given(st.one_of(st.text(max_size=60), url_ish))
@example("nbd://[/x")
@example("nbd://[::1/x")
@example("file://[")
@example("nbds://host:65536/disk")
@example("nbd://\uff03host/disk")
@example("nbd+unix:///../../etc?socket=/tmp/s")
@example("nbd://localhost/%2e%2e%2fetc")
@pytest.mark.bad_input
def test_parse_target_raises_only_usage_errors(text: str) -> None:
    check_target(text)


@FUZZ
@given(st.sampled_from(["nbd", "nbds", "nbd+unix"]), st.lists(piece, max_size=3),
       st.integers(min_value=-10, max_value=10**6) | st.none())
@pytest.mark.bad_input
def test_parse_target_hostile_export_names(scheme: str, export: list[str],
                                           port: int | None) -> None:
    name = "".join(export)
    host = "" if scheme == "nbd+unix" else "localhost" if port is None else f"localhost:{port}"
    query = "?socket=/run/s" if scheme == "nbd+unix" else ""
    check_target(f"{scheme}://{host}/{name}{query}")


# -- domain XML ---------------------------------------------------------------------------

ATTR_VALUES = st.sampled_from(
    ["block", "network", "file", "volume", "dir", "scsi", "subsystem", "capabilities", "disk",
     "lun", "cdrom", "floppy", "raw", "qcow2", "iscsi", "nbd", "rbd", "", " ", "vdb", "sda",
     "/dev/sdb", "iqn.2026-11.org.example:array/3", "iqn.x/", "iqn/abc", "/", "-1", "0",
     "3260", "abc", "99999999999999999999", "1e3", " 7 ", "scsi_host3", "scsi_host",
     "scsi_host-1", "scsi_host²", "pool", "vol", "&amp;", "&lt;x&gt;", "&#0;", "&#x1F600;"]
) | st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"],
                          exclude_characters="<>&'\""), max_size=8)

ELEMENTS = ["name", "uuid", "devices", "disk", "hostdev", "source", "target", "driver",
            "host", "adapter", "address", "alias", "serial", "wwn", "readonly", "boot"]
ATTRIBUTES = ["type", "device", "dev", "bus", "name", "file", "protocol", "pool", "volume",
              "mode", "port", "unit", "target", "managed"]


@st.composite
def xml_element(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(st.sampled_from(ELEMENTS))
    attrs = draw(st.dictionaries(st.sampled_from(ATTRIBUTES), ATTR_VALUES, max_size=4))
    attr_text = "".join(f" {k}='{v}'" for k, v in attrs.items())
    children = draw(st.lists(xml_element(depth + 1), max_size=2)) if depth < 2 else []
    text = draw(st.sampled_from(["", "x", "42", " ", "&amp;", "&#65;"]))
    return f"<{tag}{attr_text}>{text}{''.join(children)}</{tag}>"


def attrs_text(attrs: dict[str, str | None]) -> str:
    return "".join(f" {k}='{v}'" for k, v in attrs.items() if v is not None)


@st.composite
def likely_raw_device(draw: st.DrawFn) -> str:
    """A ``<disk>`` or ``<hostdev>`` close to a raw disk, with hostile values in its slots."""
    value = st.none() | ATTR_VALUES
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["block", "network", "volume", "file", "dir"]) | value)
        source = attrs_text({"dev": draw(value), "protocol": draw(st.just("iscsi") | value),
                             "name": draw(value), "pool": draw(value), "volume": draw(value)})
        host = attrs_text({"name": draw(value), "port": draw(value)})
        return (f"<disk{attrs_text({'type': kind, 'device': draw(value)})}>"
                f"<driver{attrs_text({'type': draw(st.just('raw') | value)})}/>"
                f"<source{source}><host{host}/></source>"
                f"<target{attrs_text({'dev': draw(value), 'bus': draw(value)})}/>"
                f"{draw(st.sampled_from(['', '<readonly/>', '<serial>S</serial>']))}</disk>")
    address = attrs_text({"bus": draw(value), "target": draw(value), "unit": draw(value)})
    return (f"<hostdev{attrs_text({'type': draw(st.just('scsi') | value), 'mode': draw(value)})}>"
            f"<source{attrs_text({'protocol': draw(value), 'name': draw(value)})}>"
            f"<host{attrs_text({'name': draw(value), 'port': draw(value)})}/>"
            f"<adapter{attrs_text({'name': draw(value)})}/><address{address}/></source>"
            f"<alias{attrs_text({'name': draw(value)})}/></hostdev>")


@st.composite
def domain_documents(draw: st.DrawFn) -> str:
    root = draw(st.sampled_from(["domain", "domain", "domain", "Domain", "x:domain", "other"]))
    body = draw(st.lists(xml_element(), max_size=3))
    devices = draw(st.lists(
        st.builds(lambda tag, attrs, inner: f"<{tag}{attrs}>{''.join(inner)}</{tag}>",
                  st.sampled_from(["disk", "hostdev"]),
                  st.dictionaries(st.sampled_from(ATTRIBUTES), ATTR_VALUES, max_size=4).map(
                      lambda a: "".join(f" {k}='{v}'" for k, v in a.items())),
                  st.lists(xml_element(1), max_size=4)) | likely_raw_device(),
        max_size=4))
    prolog = draw(st.sampled_from([
        "", "", "", "", "", "<?xml version='1.0'?>", "<?xml version='1.0' encoding='UTF-16'?>",
        "<!DOCTYPE domain [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>",
        "<!DOCTYPE domain [<!ENTITY e 'aaaaaaaaaa'><!ENTITY f '&e;&e;&e;&e;&e;&e;&e;&e;'>"
        "<!ENTITY g '&f;&f;&f;&f;&f;&f;&f;&f;&f;'><!ENTITY h '&g;&g;&g;&g;&g;&g;&g;&g;'>]>",
        "<!DOCTYPE domain SYSTEM 'http://192.0.2.1/x.dtd'>", "<!-- c -->",
    ]))
    ns = " xmlns:x='urn:x'" if root.startswith("x:") else ""
    entity = draw(st.sampled_from(["", "", "", "&e;", "&h;", "&undefined;"]))
    return (f"{prolog}<{root}{ns}>{entity}{''.join(body)}<devices>{''.join(devices)}"
            f"</devices></{root}>")


def check_domain_xml(text: str, tmp_sysfs: str) -> None:
    try:
        xml = DomainXML.parse(text)
    except UsageError:
        return
    assert xml.element.tag == "domain"
    try:
        inventory = inventory_from_xml(xml, running=False,
                                       resolve_volume=lambda pool, vol: ("/dev/x", True),
                                       sysfs_root=tmp_sysfs)
    except UsageError:
        return
    assert isinstance(inventory, DiskInventory)
    for disk in inventory.raw:
        assert isinstance(disk, RawDisk)
        assert RawDisk.from_dict(json.loads(json.dumps(disk.to_dict()))) == disk


SYSFS = "/nonexistent-rdmb-sysfs"


@FUZZ
@given(domain_documents())
@example("<domain><devices><disk type='network'><driver type='raw'/><source protocol='iscsi'"
         " name='iqn.x/1'><host name='h' port='abc'/></source></disk></devices></domain>")
@example("<domain><devices><hostdev type='scsi'><source><adapter name='scsi_host0'/>"
         "<address bus='x' target='0' unit='0'/></source></hostdev></devices></domain>")
@example("<domain><devices><disk type='network'><source protocol='iscsi' name='iqn/'>"
         "<host name='h'/></source></disk></devices></domain>")
@pytest.mark.bad_input
def test_domain_xml_grammar(text: str) -> None:
    check_domain_xml(text, SYSFS)


@FUZZ
@given(st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: b"<domain>" + b))
@example(b"\xff\xfe<\x00d\x00")
@example(b"<?xml version='1.0' encoding='latin-1'?><domain/>")
@pytest.mark.bad_input
def test_domain_xml_raw_bytes(data: bytes) -> None:
    check_domain_xml(data.decode("latin-1"), SYSFS)


@FUZZ
@given(st.text(max_size=200))
@example(nested(5000).replace("[", "<a>").replace("]", "</a>"))
@pytest.mark.bad_input
def test_domain_xml_random_text(text: str) -> None:
    check_domain_xml(text, SYSFS)


# -- manifests ----------------------------------------------------------------------------


def real_manifest() -> dict[str, Any]:
    disk = RawDisk(target="vdb", source_kind=SourceKind.ISCSI, device="lun", bus="scsi",
                   serial="S1", iscsi=None, size=1 << 20)
    root = StorageNode(kind="loop", name="loop9", path="/dev/loop9", size=1 << 20,
                       identity={"wwid": "x"})
    root.extents.append(Extent(0, 1 << 20, 0, StorageNode(kind="file", name="img",
                                                           path="/var/img", size=1 << 20)))
    mapping = RawDiskMapping(disk="vdb", agent="linux", root=root, identifiers={"serial": "S1"})
    record = DiskRecord(disk=disk, size=1 << 20, data_file="vdb.qcow2", format="qcow2",
                        digest=Digest("sha256", "00" * 32), level="full", data_path="qemu",
                        bytes_transferred=512, stored_bytes=4096, reason="test",
                        mapping=mapping, chunk_map="vdb.chunkmap",
                        chunk_map_digest=Digest("sha256", "11" * 32),
                        storage_snapshot={"name": "s"}, location={"offset": 0})
    manifest = Manifest(backup_id=new_backup_id(), domain_uuid=UUID, domain_name="vm",
                        level="full", created="2026-01-01T00:00:00Z",
                        completed="2026-01-01T00:00:01Z", consistency={"method": "offline"},
                        domain_xml="<domain/>", disks=[record])
    return dict(json.loads(manifest.dumps()))


REAL_MANIFEST = real_manifest()


def check_manifest_text(text: str) -> None:
    try:
        manifest = Manifest.loads(text)
    except RepositoryError:
        return
    assert isinstance(manifest, Manifest)
    for record in manifest.disks:
        assert isinstance(record, DiskRecord)


def test_real_manifest_round_trips() -> None:
    manifest = Manifest.loads(json.dumps(REAL_MANIFEST))
    assert manifest.to_dict() == REAL_MANIFEST


@FUZZ
@given(json_trees)
@pytest.mark.bad_input
def test_manifest_random_json(tree: Any) -> None:
    check_manifest_text(json.dumps(tree))


@FUZZ
@given(mutations(REAL_MANIFEST))
@example({**REAL_MANIFEST, "version": float("inf")})
@example({**REAL_MANIFEST, "disks": [{**REAL_MANIFEST["disks"][0], "size": float("-inf")}]})
@example({**REAL_MANIFEST, "disks": [{**REAL_MANIFEST["disks"][0],
                                      "mapping": {**REAL_MANIFEST["disks"][0]["mapping"],
                                                  "version": float("inf")}}]})
@pytest.mark.bad_input
def test_manifest_mutations(document: Any) -> None:
    check_manifest_text(json.dumps(document))


@FUZZ
@given(st.text(max_size=200) | st.sampled_from([nested(100000), "Infinity", "NaN", "{" * 3]))
@pytest.mark.bad_input
def test_manifest_random_text(text: str) -> None:
    check_manifest_text(text)


@pytest.mark.parametrize(("digest", "why"), [
    ({"algorithm": "md5", "value": "00" * 16}, "not accepted"),
    ({"algorithm": "sha1", "value": "00" * 20}, "not accepted"),
    ({"algorithm": "crc32", "value": "00" * 4}, "not accepted"),
    ({"algorithm": "sha256", "value": "00" * 31}, "malformed sha256"),
    ({"algorithm": "sha256", "value": "zz" * 32}, "malformed sha256"),
])
@pytest.mark.bad_input
def test_manifests_with_weak_or_malformed_digests_are_damaged(digest: dict[str, str],
                                                              why: str) -> None:
    for key in ("digest", "chunk_map_digest"):
        document = copy.deepcopy(REAL_MANIFEST)
        document["disks"][0][key] = digest
        with pytest.raises(RepositoryError, match=why):
            Manifest.loads(json.dumps(document))
    strong = copy.deepcopy(REAL_MANIFEST)
    strong["disks"][0]["digest"] = {"algorithm": "sha512", "value": "ab" * 64}
    assert Manifest.loads(json.dumps(strong)).disks[0].digest.algorithm == "sha512"


@pytest.mark.bad_input
def test_oversized_or_non_utf8_manifests_are_damaged(tmp_path: Path) -> None:
    """Listed as damaged backups (exit 5 for their users), read with a size cap."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    good = Manifest.loads(json.dumps(REAL_MANIFEST))
    for text, why in ((b"\xff\xfe" + bytes(100), "not UTF-8"),
                      (b" " * (MAX_MANIFEST + 10), f"over {MAX_MANIFEST} bytes")):
        backup = Path(repo.backup_dir(UUID, new_backup_id()))
        backup.mkdir(parents=True)
        (backup / "manifest.json").write_bytes(text)
        readable, damaged = repo.scan(UUID)
        assert readable == [] and why in damaged[-1].problem, damaged
        shutil.rmtree(backup)
    assert good.disks[0].digest.algorithm == "sha256"


@pytest.mark.bad_input
def test_chunk_maps_longer_than_the_disk_needs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vdb.chunks"
    ChunkMap.zero(1 << 20).save(str(path))
    assert ChunkMap.load(str(path), 1 << 20) == ChunkMap.zero(1 << 20)
    with open(path, "ab") as stream:
        stream.write(bytes(1 << 20))
    with pytest.raises(RepositoryError, match="over"):
        ChunkMap.load(str(path), 1 << 20)


@FUZZ
@given(mutations(REAL_MANIFEST["disks"][0]["mapping"]).filter(lambda d: isinstance(d, dict))
       | st.dictionaries(st.sampled_from(["format", "version", "disk", "agent", "storage",
                                          "identifiers"]), json_trees))
@example({**REAL_MANIFEST["disks"][0]["mapping"], "version": 1e400})
@example({**REAL_MANIFEST["disks"][0]["mapping"],
          "storage": {"kind": "disk", "name": "x", "size": 1,
                      "extents": [{"start": float("inf"), "length": 1, "offset": 0,
                                   "target": {"kind": "file", "name": "y"}}]}})
@pytest.mark.bad_input
def test_raw_disk_mapping_documented_errors(document: Any) -> None:
    try:
        mapping = RawDiskMapping.from_dict(document)
    except (KeyError, TypeError, ValueError):
        return
    assert isinstance(mapping, RawDiskMapping)


# -- chunk maps ---------------------------------------------------------------------------


def valid_chunkmap(size: int) -> bytes:
    count = -(-size // 65536)
    digests = b"".join(chunk_digest(bytes([i % 256])) for i in range(count))
    header = {"format": "libvirt-rdm-backup/chunkmap", "version": 1, "algorithm": "sha256-128",
              "digest_size": 16, "chunk_size": 65536, "size": size, "count": count,
              "body": hashlib.blake2b(digests, digest_size=32).hexdigest()}
    head = json.dumps(header, sort_keys=True).encode()
    return b"RDMBCMAP" + struct.pack(">I", len(head)) + head + digests


VALID_CHUNKMAP = valid_chunkmap(5 * 65536 + 100)


def with_header(header: bytes) -> bytes:
    return b"RDMBCMAP" + struct.pack(">I", len(header)) + header


def check_chunkmap(data: bytes) -> None:
    try:
        chunk_map = ChunkMap.from_bytes(data)
    except RepositoryError:
        return
    assert len(chunk_map.digests) == chunk_map.count * 16


def test_valid_chunkmap_parses() -> None:
    assert ChunkMap.from_bytes(VALID_CHUNKMAP).count == 6


@FUZZ
@given(st.binary(max_size=400) | st.binary(max_size=300).map(lambda b: b"RDMBCMAP" + b))
@example(with_header(nested(10000).encode()))
@example(with_header(b'{"format": 1e999}'))
@pytest.mark.bad_input
def test_chunkmap_random_bytes(data: bytes) -> None:
    check_chunkmap(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_CHUNKMAP) - 1), st.integers(0, 255)),
                min_size=1, max_size=6),
       st.integers(0, len(VALID_CHUNKMAP)))
@pytest.mark.bad_input
def test_chunkmap_mutated_bytes(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID_CHUNKMAP)
    for position, value in flips:
        data[position] = value
    check_chunkmap(bytes(data))
    check_chunkmap(VALID_CHUNKMAP[:cut])


@FUZZ
@given(mutations(json.loads(VALID_CHUNKMAP[12:12 + struct.unpack(">I", VALID_CHUNKMAP[8:12])[0]])))
@pytest.mark.bad_input
def test_chunkmap_mutated_header(header: Any) -> None:
    body = VALID_CHUNKMAP[12 + struct.unpack(">I", VALID_CHUNKMAP[8:12])[0]:]
    check_chunkmap(with_header(json.dumps(header).encode()) + body)


# -- NBD volume superblocks ---------------------------------------------------------------

HEAD = struct.Struct(">8sQQ32s")


def superblock_bytes(body: bytes, magic: bytes = b"RDMBVOL1", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return HEAD.pack(magic, 3, size, hashlib.sha256(body).digest()) + body


def check_superblock(data: bytes) -> None:
    block = Superblock.from_bytes(data)  # documented: None, never an exception
    if block is not None:
        assert isinstance(block, Superblock)
        assert isinstance(block.entries, list)


def test_superblock_round_trips() -> None:
    block = Superblock("abc123", generation=4, entries=[{"backup_id": "x"}])
    data = block.to_bytes().ljust(SLOT, b"\0")
    assert Superblock.from_bytes(data) == block


@FUZZ
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"RDMBVOL1" + b))
@pytest.mark.bad_input
def test_superblock_random_bytes(data: bytes) -> None:
    check_superblock(data)


@FUZZ
@given(json_trees | mutations({"format": "libvirt-rdm-backup/nbd-volume", "version": 1,
                               "id": "abc123", "next_free": 2 << 20, "entries": [{"a": 1}]}))
@example([])
@example({"format": "libvirt-rdm-backup/nbd-volume", "version": 1, "id": "x",
          "next_free": float("inf"), "entries": []})
@pytest.mark.bad_input
def test_superblock_checksummed_hostile_body(doc: Any) -> None:
    check_superblock(superblock_bytes(json.dumps(doc).encode()))
    check_superblock(superblock_bytes(json.dumps(doc).encode())[:HEAD.size - 1])


@pytest.mark.bad_input
def test_superblock_deep_json_body() -> None:
    check_superblock(superblock_bytes(nested(200000).encode()))


# -- agent requests -----------------------------------------------------------------------

VALID_DISK = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                     source_path="/dev/loop9").to_dict()


def check_answer(request: Any) -> None:
    answer = handle(request, agents=[], sources=lambda: ())  # nothing of this machine probed
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool)
    json.dumps(answer)
    if not answer["ok"]:
        assert "internal error" not in answer["error"], answer
        assert "\n" not in answer["error"]
        assert answer["exit_code"] in (2, 3, 4, 5)


@FUZZ
@given(json_trees | st.dictionaries(st.sampled_from(["op", "disk"]), json_trees, max_size=2)
       | st.builds(lambda disk: {"op": "map", "disk": disk}, mutations(VALID_DISK) | json_trees))
@example({"op": "map", "disk": {**VALID_DISK, "iscsi": {"host": "h", "port": 1, "iqn": "i",
                                                        "lun": float("inf")}}})
@example({"op": "map", "disk": {**VALID_DISK, "size": 10**400}})
@example({"op": ["version"]})
@pytest.mark.bad_input
def test_agent_handle_random_requests(request: Any) -> None:
    check_answer(request)


@FUZZ
@given(mutations(VALID_DISK) | json_trees)
@pytest.mark.bad_input
def test_disk_from_request_only_usage_errors(data: Any) -> None:
    try:
        disk = disk_from_request(data)
    except UsageError:
        return
    assert isinstance(disk, RawDisk)


# -- agent addresses ----------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=60) | url_ish
       | st.builds(lambda parts: "ssh://" + "".join(parts), st.lists(piece, max_size=5))
       | json_scalars)
@example("ssh://root@[::1]:22")
@example("ssh://[::1")
@example("ssh://host:0")
@example("ssh://host:99999")
@example("ssh://-oProxyCommand=x")
@example("ssh://host\n")
@pytest.mark.bad_input
def test_parse_agent_uri_only_usage_errors(text: Any) -> None:
    try:
        address = parse_agent_uri(text)
    except UsageError:
        return
    assert isinstance(address, AgentAddress)
    assert not address.host.startswith("-")
    assert address.port is None or 1 <= address.port <= 65535
    for bad in ("\x00", "\n", " ", "/", "@", "$", "`", ";", "|", "&"):
        assert bad not in address.host and bad not in (address.user or "")
    assert parse_agent_uri(address.uri) == address


# -- names used as paths ------------------------------------------------------------------

FORBIDDEN = ["/", "$", "`", ";", "|", "&", "\x00", " ", "\t", "\n", "\r", "\x0b", "\x0c",
             "\u00a0", "\u2028", "\\", "'", '"', "*", "?", "<", ">", "(", ")", "~"]


@FUZZ
@given(st.text(max_size=40)
       | st.builds(lambda parts: "".join(parts), st.lists(piece, max_size=5))
       | st.builds(lambda a, bad, b: a + bad + b, st.text("ab1.-_", max_size=5),
                   st.sampled_from([*FORBIDDEN, "..", "../", "/.."]),
                   st.text("ab1.-_", max_size=5)))
@example("..")
@example(".")
@example("../x")
@example("x/../y")
@example("vdb\n")
@example("vdb\x00")
@example("$(reboot)")
@pytest.mark.bad_input
def test_names_refuse_traversal_and_shell_metacharacters(name: str) -> None:
    for check in (check_backup_id, lambda n: check_safe_name(n, "chain name")):
        try:
            accepted = check(name)
        except UsageError:
            continue
        assert accepted == name
        assert name not in ("", ".", "..") and not name.startswith(".")
        assert os.path.basename(name) == name
        assert not any(bad in name for bad in FORBIDDEN), name
        assert not any(c.isspace() or not c.isprintable() or not c.isascii() for c in name)
        assert os.path.normpath(os.path.join("/repo", name)).startswith("/repo/")
    # backup ids are stricter still: no dots at all
    try:
        check_backup_id(name)
    except UsageError:
        return
    assert ".." not in name


# -- the command line ---------------------------------------------------------------------

ARG_VALUES = st.sampled_from([
    *HOSTILE_PIECES, "nbd://[/x", "nbd://localhost:65536/x", "nbds://[::1]/../x", "file://[", "nbd+unix:///x",
    "nbd+unix:///x?socket=rel", "ssh://[::1", "ssh://host:0", "20260101T000000Z-abcdef",
    "full", "auto", "bogus", "--", "-", "-x", "--json",
]) | st.text(max_size=12)


@pytest.fixture
def cli_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tmp repository path as cwd; SIGTERM's handler restored after ``main`` replaces it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, previous)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # only --help may exit, with status 0
        assert stop.code in (0, None), argv
        code = 0
    err = capsys.readouterr().err
    assert code in {0, 2, 3, 4, 5}, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    assert err.count("\n") <= 1 and (not err or err.endswith("\n")), (argv, err)
    assert "internal error" not in err, (argv, err)
    return code, err


@st.composite
def repository_argv(draw: st.DrawFn) -> list[str]:
    """``list`` / ``verify`` on a path in the sandbox or an unreachable unix socket."""
    command = draw(st.sampled_from(["list", "verify"]))
    target = draw(st.sampled_from(["repo", "missing", "repo/", "./repo", "none/../repo",
                                   "file:///nonexistent-rdmb", "file://[",
                                   "nbd+unix:///x?socket=/nonexistent-rdmb.sock",
                                   "nbd://[::1/x", "nbds://localhost:0x/x", ""]))
    argv = [command, "--target", target]
    options = draw(st.lists(st.sampled_from(
        ["--backup", "--tls-creds", "--json", "domain", "--disk", "--bogus", "-c"]), max_size=3))
    for option in options:
        argv.append(option)
        if option in ("--backup", "--tls-creds", "--disk", "-c", "--bogus"):
            argv.append(draw(ARG_VALUES))
        elif option == "domain":
            argv[-1] = draw(ARG_VALUES)
    return draw(st.permutations(argv)) if draw(st.booleans()) else argv


@LIGHT
@given(argv=repository_argv())
@pytest.mark.bad_input
def test_cli_repository_commands(argv: list[str], cli_sandbox: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    (cli_sandbox / "repo").mkdir(exist_ok=True)
    from libvirt_rdm_backup.repository.store import Repository

    if not (cli_sandbox / "repo" / "rdm-backup-repository.json").exists():
        Repository.open(str(cli_sandbox / "repo"), create=True)
    run_cli(argv, capsys)


@st.composite
def backup_argv(draw: st.DrawFn) -> list[str]:
    """``backup`` that must fail before libvirt is asked for anything but the test driver."""
    bad_target = draw(st.sampled_from(
        ["", "nbd://[/x", "nbd://[::1/x", "file://[", "nbd://localhost:65536/x",
         "nbd://192.0.2.1/x", "nbd+unix:///x", "nbd+unix:///x?socket=rel", "http://x/y",
         "nbds://host/../x", "nbd://localhost/%2e%2e%2fx", "a\x00b", "a\nb", "nbd:///x",
         "nbd://user:pw@localhost/x", "nbd://\uff03host/x"]))
    bad_chain = draw(st.sampled_from(
        ["", "..", "../x", "a/b", "$(id)", "a b", "a;b", "`x`", "-x", ".hidden", "x" * 65]))
    chain = draw(st.sampled_from([bad_chain, "default"]))
    target = bad_target if chain == "default" else draw(st.sampled_from([bad_target, "repo"]))
    argv = ["backup", draw(ARG_VALUES), "--target", target, "--chain", chain,
            "-c", "test:///default"]
    extra = draw(st.lists(st.sampled_from(
        [["--level", "bogus"], ["--level", "full"], ["--quiesce"], ["--quiesce=never"],
         ["--agent", "ssh://[::1"], ["--agent", "ssh://host:0"], ["--agent", "not a uri"],
         ["--disk", "vdb"], ["--json"], ["--allow-plain-nbd"], ["--unknown"], ["--all"],
         ["--jobs", "0"], ["--exclude", ""]]), max_size=3))
    return argv + [word for option in extra for word in option]


@LIGHT
@given(argv=backup_argv())
@pytest.mark.bad_input
def test_cli_backup_refuses_bad_input(argv: list[str], cli_sandbox: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(argv, capsys)
    assert code != 0 and err.startswith("rdm-backup: error:"), (argv, err)
    assert not (cli_sandbox / "repo").exists()  # nothing was created


COMMANDS = {"disks", "map", "backup", "restore", "verify", "hook", "export", "receive", "list",
            "agent", "schedule"}


@LIGHT
@given(argv=st.lists(ARG_VALUES | st.sampled_from(
    ["disks", "map", "backup", "restore", "verify", "hook", "export", "receive", "list",
     "--target", "--backup", "--level", "--chain", "--size", "--timeout", "--listen",
     "--socket", "--json", "--disk", "--to", "-c"]), max_size=6))
@pytest.mark.bad_input
def test_cli_random_argv_without_a_command(argv: list[str], cli_sandbox: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # argv without a command word: argparse refuses it, with one line; nothing can act on
    # this machine (no hook is installed, no server started, no libvirt contacted)
    assume(not set(argv) & COMMANDS)
    assume(not any(word.startswith("-h") or word.startswith("--h") for word in argv))
    run_cli(argv, capsys)
