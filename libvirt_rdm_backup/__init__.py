"""libvirt-rdm-backup: backup and restore of raw disks of libvirt/QEMU virtual machines."""

__version__ = "0.1.0"
