"""The index of an ``rbd://`` target (:mod:`.rbd_store`), read within bounds.

The index is one rados object whose omap anyone who can write the pool can fill (many
keys, huge values, keys this tool never writes). Reading it makes this host hold at most:

- **one page of keys**: keys are listed ``KEY_PAGE`` at a time (``start_after`` paging). The
  OSD caps one reply at ``osd_max_omap_entries_per_request`` keys (1024 by default in Ceph
  16) and ``osd_max_omap_bytes_per_request`` bytes (1 GiB, plus the key that passes it). Of a
  page only the keys of the forms this tool writes (at most 62 characters) are kept, as the
  caller picks them; the others are counted and dropped with their page.
- **the kept keys**: an index of more than ``MAX_INDEX_KEYS`` keys (of any form) is refused
  (VerificationError, exit 5, "damaged") at the page that passes the bound: no page after
  it is listed and no value is read.
- **one batch of values**: values are read by key, ``VALUE_BATCH`` kept keys per op, never
  those of keys dropped. The OSD caps no reply by key: a value comes whole, as large as one
  write could make it (``osd_max_write_size``, 90 MiB by default), so one reply holds at most
  ``VALUE_BATCH`` times that. Each value is handed to the caller (which checks it against
  MAX_MANIFEST and parses it) before the next batch is read, and is not kept.

So the memory of a read is bounded by one reply (as above) plus the kept keys (at most
``MAX_INDEX_KEYS`` of at most 62 characters) plus what the caller makes of their values;
its time by ``MAX_INDEX_KEYS / KEY_PAGE`` listing ops and one op per ``VALUE_BATCH`` kept keys.

Many ops instead of one: each reads the object at one version. When the version changed
during a read (a point published or pruned meanwhile), the whole index is read again, up to
``ATTEMPTS`` times, and the last reading is taken then (each value read whole, as written).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, TypeVar

from libvirt_rdm_backup.errors import VerificationError

# Keys an index may hold: its repository id, and a manifest per point. 2,097,152 is 10,000
# domains with some 200 points each (a daily, weekly and monthly retention keeps about 50);
# listing that many takes 2,048 ops of about 70 KiB each, and the kept keys about 300 MiB
# (150 bytes each, measured) when the read keeps every one (all manifests, no domain asked).
MAX_INDEX_KEYS = 1 << 21
KEY_PAGE = 1024  # keys per listing op (the OSD's default cap per reply)
VALUE_BATCH = 8  # values per op: a manifest is some KiB, at most MAX_MANIFEST (4 MiB)
ATTEMPTS = 3  # readings of an index that changes meanwhile

Pick = Literal["value", "key"] | None  # read the key's value / note the key alone / drop it
T = TypeVar("T")


class OmapPool(Protocol):
    """What of :class:`~libvirt_rdm_backup.storage.rbd_pool.RbdPool` a reading uses."""

    def omap_keys(self, name: str, after: str, count: int) -> tuple[list[str], int]: ...

    def omap_values(self, name: str, keys: list[str]) -> tuple[dict[str, bytes], int]: ...


def read_index(
    pool: OmapPool,
    name: str,
    where: str,
    pick: Callable[[str], Pick],
    parse: Callable[[str, bytes | None], T],
) -> list[T]:
    """What ``parse`` makes of each key ``pick`` keeps (with its value, or None for a key
    picked alone), in key order. ``where`` names the index in error lines."""
    found: list[T] = []
    for _attempt in range(ATTEMPTS):
        picked, versions = _keys(pool, name, where, pick)
        found = [parse(key, None) for key, how in picked.items() if how == "key"]
        wanted = [key for key, how in picked.items() if how == "value"]
        for start in range(0, len(wanted), VALUE_BATCH):
            batch = wanted[start : start + VALUE_BATCH]
            values, version = pool.omap_values(name, batch)
            versions.add(version)
            found.extend(parse(key, values[key]) for key in batch if key in values)
            del values
        if len(versions) <= 1:
            break
    return found


def _keys(
    pool: OmapPool, name: str, where: str, pick: Callable[[str], Pick]
) -> tuple[dict[str, Pick], set[int]]:
    """The keys ``pick`` keeps (in order) and the versions their pages were read at;
    VerificationError for an index of more than MAX_INDEX_KEYS keys, or one whose listing
    makes no progress (keys the bindings show cut short at a NUL byte)."""
    picked: dict[str, Pick] = {}
    versions: set[int] = set()
    after, count = "", 0
    while True:
        page, version = pool.omap_keys(name, after, KEY_PAGE)
        if not page:
            return picked, versions
        versions.add(version)
        count += len(page)
        if count > MAX_INDEX_KEYS:
            raise VerificationError(
                f"{where} holds more than {MAX_INDEX_KEYS} keys (not an "
                "index this tool writes): refused, not read further"
            )
        if page[-1] <= after:
            raise VerificationError(
                f"{where}: its keys cannot be listed past "
                f"{after[:64]!r} (keys this tool does not write)"
            )
        for key in page:
            if key > after:
                how = pick(key)
                if how is not None:
                    picked[key] = how
                after = key
