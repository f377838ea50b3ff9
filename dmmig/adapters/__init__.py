"""Adapters: one module per outside system (dmsetup and the dm targets, era tools, loop and
block devices, qemu-nbd and libnbd, nbd-client, ssh, the tunnel, XenStore, xl, udev).
They import only dmmig's basics (errors, validate, sizing, progress) and each other.
"""
