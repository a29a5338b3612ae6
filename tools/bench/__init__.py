"""Benchmark of rdm-backup on raw LUNs against dd, qemu-img, libvirt's backup-begin and peers.

One module per section (:mod:`tools.bench.full`, ``nbd``, ``incremental``, ``peer``,
``resync``, ``restore``, ``live``, ``mount``, ``prune``, ``lun``, ``rbd``, ``guestio``,
``atrest``, ``rss``), what they share in :mod:`tools.bench.common`, the command line in
:mod:`tools.bench.runner`. The lab fixtures (domains, loop devices, tgt targets) come from
:mod:`tools.labkit`, the module the tests use; the tiny real guest from :mod:`tools.guestkit`.

A file under /var/tmp/rdmb-* (``--size-mib``, 4 GiB by default) becomes a LUN (a loop
device). Before anything runs it is filled on the host side: ``--fill`` of it (1 GiB by
default) with random (incompressible) data in scattered ``--extent-mib`` extents, the rest
written as zeros. A firmware-only domain (KVM where available) gets the loop device as
``vdb`` (``<disk type='block' device='disk'>``) and is started. Then, ``--repeat`` times
(median reported), each measured after ``sync``, a page-cache drop (``echo 3 >
/proc/sys/vm/drop_caches``) and a ``--settle`` pause, in an order rotated per round:

* ``rdm-backup``: :func:`libvirt_rdm_backup.api.backup` of vdb into a fresh repository
  (the whole call: discovery, QEMU job, digest, publish with fsync);
* ``dd``: ``dd if=/dev/loopX of=FILE bs=4M iflag=direct oflag=direct`` (same device, a
  plain file in the same filesystem, on disk when dd exits);
* ``backup-begin``: libvirt push-mode backup (``virDomainBackupBegin``, what ``virsh
  backup-begin`` calls) of vdb to a raw file and (unless ``--no-qcow2``) a qcow2 file,
  timed until the job is gone; the time with an fsync of the result is reported beside it.

Ratios are rdm-backup time / other time (below 1: rdm-backup is faster) and stored bytes
of the backup / bytes of data in the LUN.

The sections (``--sections``, default all of them, run in this order in one process):

* ``full``: the comparison above.
* ``nbd``: the same full backup of vdb pushed to an NBD volume, against the same to a file
  repository and against a bare ``qemu-img convert`` into an NBD export. ``--repeat``
  rounds in a rotated order, each measured after the page-cache drop, of:

  - ``file_target_s``: :func:`api.backup` of vdb into a fresh repository directory (as
    ``rdm-backup`` of ``full``);
  - ``nbd_push_s``: :func:`api.backup` of vdb with ``target="nbd://127.0.0.1:PORT/EXPORT"``
    into a fresh volume file served by ``rdm-backup receive --volume FILE --listen
    127.0.0.1:PORT --export EXPORT --json`` (the VM's QEMU writes the qcow2 layer over NBD);
  - ``qemu_img_convert_nbd_s``: ``qemu-img convert -f raw -O raw /dev/loopX
    nbd://127.0.0.1:PORT2/EXPORT2`` into a plain ``qemu-nbd -f raw --persistent
    --shared=0 -b 127.0.0.1 -p PORT2 -x EXPORT2 FILE`` export of a fresh sparse raw file of
    the LUN's size (raw only: an NBD export is raw), timed as the whole command (it flushes
    the export when it closes it).

  The servers are started (and found listening) before the page-cache drop and stopped by
  pid afterwards (``receive`` with SIGTERM, then its ``qemu-nbd`` by pid if it outlived
  it); the time they take is not measured. Reported: push time / file-target time (goal
  <= 1.3) and push time / convert time (no goal: context), and the bytes each result takes on disk
  (``st_blocks``): the volume file after the push / the data in the LUN. It runs right
  after ``full``, before anything rewrites the LUN.
* ``incremental``: ``--repeat`` rounds, in one repository, of: a full backup of vdb
  (``level="full"``), then ``--dirty`` of the LUN (1%) rewritten by the guest side (HMP
  ``qemu-io`` writes of 64 KiB at scattered 64 KiB-aligned offsets, one monitor command
  each), then ``level="incremental"``; each measured after the page-cache drop. Reported:
  incremental time / full time (goal <= 0.05) and bytes the incremental backup takes on
  disk / rewritten bytes (goal <= 1.2). Then another rewrite of the same size and the
  same incremental through the ``rdm-backup`` command (a whole process, like the peer's):
  its time / the API's (goal <= 1.3).
* ``peer``: Debian's ``virtnbdbackup`` on a qcow2 disk of the same size and the same data
  (``qemu-img convert`` of the freshly filled LUN file, so its zeros are not allocated) as
  ``vdb`` of a second firmware-only domain: ``-l full`` then, after the same rewrites,
  ``-l inc``, each timed as a whole command. Reported: our raw-LUN incremental time / its
  qcow2 incremental time (goal <= 1.0) and both full times. Its libvirt checkpoints are
  deleted between rounds and at the end, before the domain is undefined.
* ``resync``: a resync after a domain restart (QEMU's dirty bitmaps gone) with 1% changed:
  time / full time and bytes stored. Measured only when the library offers the level
  ``resync`` (:class:`libvirt_rdm_backup.modes.Level`); otherwise reported as not
  measured.
* ``restore``: :func:`api.restore` of vdb's full backup onto a fresh loop device against
  ``dd`` of vdb onto one (``conv=fsync``): restore throughput / dd throughput (goal >= 0.9).
* ``live``: ``rdm-backup restore --live`` of the tiny real guest's LUN (a loop device of its
  own, ``--size-mib`` with the same ``--fill``), its contents destroyed after a full backup,
  timed from the command's start: until the domain runs, and until the guest has read 1 MiB
  near the end of its disk (``dd iflag=direct``) and it matches the backup point (goal <= 10
  s); the copy back's throughput (the LUN's size / the tool's time after the guest ran)
  against ``dd`` of the point onto the same device (goal >= 0.8). Then the LUN is compared
  with the point. See :mod:`tools.bench.live`.
* ``mount``: ``rdm-backup mount`` of a full backup of a LUN of its own (a GPT, one ext4 with
  ``--fill`` of random data in a file and a few small files) on a firmware-only domain's vdb:
  ``--repeat`` rounds, with the layers' digests checked (the default) and with
  ``--no-verify``, each timed until the command returned (the filesystem mounted), the files
  checked, then ``rdm-backup umount`` timed. No goal. See :mod:`tools.bench.mount`.
* ``prune``: a full and 20 incrementals of vdb (``--dirty`` rewritten before each), then
  ``api.prune`` with ``keep_last=1``: the time, and the bytes QEMU wrote into the kept layer
  (its own data before and after, ``qemu-img map``) / the bytes that had to move (goal <= 1.1).
* ``lun``: SCSI passthrough LUNs backed up through storage snapshots. Two iSCSI LUNs of
  ``--size-mib`` each (the same ``--fill`` of random data), served by the lab's tgtd from
  files on the lab's reflink XFS (so the ``tgt-reflink`` storage agent snapshots them),
  attached as ``device='lun'`` ``sda`` and ``sdb`` on virtio-scsi, and a loop device of the
  same size and data as ``vdb`` (``<disk type='block' device='disk'>``), in a third
  firmware-only domain. Measured, each after the page-cache drop:

  - the pause window: ``--repeat`` full backups of all three disks (:func:`api.backup`);
    ``manifest.consistency["paused_ms"]`` (median; goal <= 100 ms) and its method;
  - the window under load: 20 backups of all three (a full, then incrementals) while a
    ``dd`` keeps rewriting ``sdb``'s backing file through the page cache (16 MiB, a pause
    of 0.25 s, again): p50 and worst of ``paused_ms`` (goal: worst <= 100 ms);
  - ``--repeat`` rounds, each in a fresh repository, of a full backup of ``sda`` alone and
    ``qemu-img convert -f raw -O raw iscsi://127.0.0.1:3260/IQN/1 FILE`` and ``-O qcow2``
    of the same LUN (rotated order): backup time / convert time (goal <= 1.0 for raw;
    beside it, as context, the ratio to the raw convert followed by an fsync of its file);
    then ``--dirty`` of ``sda`` rewritten by the guest side (as in ``incremental``, on the
    LUN's qdev) and an incremental backup of ``sda``: time / full time and bytes it takes on disk /
    rewritten bytes; the data path and level of every disk are reported (``snapshot``,
    ``incremental``: the point came from a storage snapshot and only the ranges the
    storage reports as changed were read).

  The storage snapshots the repositories keep (clones in ``.rdmb-snapshots`` beside the
  backing files, tgt targets presenting them) are deleted before the repositories.

* ``rbd``: an RBD disk of the lab's Ceph cluster (``--size-mib``, every byte random data, so
  that 1% rewritten is 1% of what the full copied) backed up through RBD snapshots: a full,
  ``--dirty`` rewritten by the guest side, an incremental (the extents ``diff_iterate``
  reports): time / full time (goal <= 0.05) and stored / rewritten bytes (goal <= 1.2);
  beside it the same on a loop LUN of the same size and data through QEMU's dirty bitmap
  (the RBD incremental's time / the loop's, as context), then the RBD disk in the bench's
  sparse ``--fill`` layout (its ratio as context, no goal). See :mod:`tools.bench.rbd`.
* ``guestio``: guest write latency during a backup to a throttled NBD target, with a
  plain ``blockdev-backup`` job (as before) and with the tool's break-snapshot filter and
  local fleecing image, as ratios to no backup running (see :mod:`tools.bench.guestio`).
* ``atrest``: backups at rest on a LUN of its own holding compressible text (``--fill`` of
  random lines of this repository's sources and docs): plain full, ``compress="zstd"`` and
  ``"zlib"`` fulls, an encrypted full (``encrypt_key_file``) and ``zstd -T0`` of the device:
  time and bytes stored of each; compressed / plain, repository zstd / ``zstd -T0``,
  encrypted time / plain time (goal <= 1.3). See :mod:`tools.bench.atrest`.
* ``rss``: peak RSS of the ``rdm-backup`` process (``wait4``) backing up (full, incremental)
  and restoring a ``--rss-size-gib`` (64) GiB sparse LUN (goal <= 100 MiB).

Goals are printed beside the ratios and together at the end (``goals``, ``goals_met`` in
the JSON); nothing is asserted against a threshold.
Everything made (domains, loop devices, iSCSI targets, files, storage snapshots,
checkpoints, NBD exports, mounts, the live restore's overlays) has "rdmb" in its name (the
peer's checkpoints are named by it, on an rdmb domain) and is removed in ``finally`` blocks;
NBD servers are stopped by pid, mounts undone by ``rdm-backup umount``.
Needs root and the lab (``make lab-up``); the peer section needs ``virtnbdbackup``, the live
section the tiny guest (``tools/build-guest.sh`` builds it on first use), the mount section
``nbdfuse`` and ``sfdisk``.

Usage (``make bench``): ``.venv/bin/python -m tools.bench [--size-mib N] [--fill F]
[--repeat N]
[--sections full,nbd,incremental,peer,resync,restore,live,mount,prune,lun,rbd,guestio,atrest,
 rss]
[--dirty F] [--settle S] [--rss-size-gib N] [--json]``
"""
