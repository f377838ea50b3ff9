"""The SSH adapter's sending of data: what paramiko costs per packet on the copy's path."""
from __future__ import annotations

import socket

import paramiko
import paramiko.packet
import pytest

import dmmig.adapters.ssh  # noqa: F401 - its import is what is tested


def test_a_packet_is_sent_without_formatting_the_repr_of_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # paramiko 2.12 (Debian 12) formatted repr(message), the whole packet escaped, into a
    # TypeError it then caught, for every packet sent: 71 instead of 258 MiB/s of copy data
    m = paramiko.Message()
    m.add_byte(bytes([paramiko.common.cMSG_CHANNEL_DATA[0]]))
    m.add_int(0)
    m.add_string(b"\x00\xff" * 16384)

    def no_repr(self: paramiko.Message) -> str:
        raise AssertionError("the repr of a whole packet, on the send path")
    monkeypatch.setattr(paramiko.Message, "__repr__", no_repr)
    a, b = socket.socketpair()
    with a, b:
        paramiko.packet.Packetizer(a).send_message(m)
        got = b""
        while len(got) < 4:
            got += b.recv(65536)
        length = int.from_bytes(got[:4], "big")
        while len(got) < 4 + length:
            got += b.recv(65536)
    padding = got[4]
    assert got[5:4 + length - padding] == m.asbytes()  # the same packet as paramiko's own path
    assert paramiko.packet.asbytes(b"raw") == b"raw" and paramiko.packet.asbytes("text") == b"text"
