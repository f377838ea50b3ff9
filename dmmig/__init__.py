"""dmmig: live migration of Xen blkback disks with stock device-mapper."""

__version__ = "0.1.0"
