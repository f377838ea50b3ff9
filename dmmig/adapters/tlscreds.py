"""Per-migration x509 credentials for --transport nbd (python3-cryptography).

The one credential type all three NBD parties speak: qemu-nbd (tls-creds-x509, or PSK), libnbd
(x509 or PSK) and nbd-client 3.24 (x509 only: -A -F -K -H, a GnuTLS proxy in userspace). The
source makes, for each migration, a throwaway CA, a server certificate for the destination's
NBD address and a client certificate, and throws the CA's key away: nothing else can ever be
signed by it. The destination gets the server's key, certificate and the CA certificate over
the SSH channel; qemu-nbd runs with verify-peer=on, so only this client gets in, and the
clients check the server against the CA and the address.

Layout of a directory (the names qemu, libnbd and this module agree on):
    ca-cert.pem  server-cert.pem  server-key.pem  client-cert.pem  client-key.pem
"""
from __future__ import annotations

import ipaddress
import os
import shutil

from dmmig.errors import BadInput

CA, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
SERVER_FILES = (CA, SERVER_CERT, SERVER_KEY)
# the hosts' clocks may differ: valid from a day before they were made
SKEW_DAYS, LIFETIME_DAYS = 1, 365


def exists(directory: str) -> bool:
    return all(os.path.exists(os.path.join(directory, f)) for f in (*SERVER_FILES, CLIENT_CERT, CLIENT_KEY))


def make(directory: str, server: str) -> None:
    """The whole set for a migration whose destination serves NBD at SERVER (an address or a
    host name) into DIRECTORY, which must be root-only already."""
    import datetime  # here, not at the top: 30 ms of every `dmmig agent` start in the rig, for one call

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmmig"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=SKEW_DAYS))
                .not_valid_after(now + datetime.timedelta(days=LIFETIME_DAYS)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = f"dmmig migration CA {os.urandom(8).hex()}"
    ca = (builder(ca_name, ca_key, ca_name)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(cn, key, ca_name)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             # qemu's checks want both bits on a leaf whose key usage is present
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    try:
        ip = ipaddress.ip_address(server.split("%")[0])
        san: list[x509.GeneralName] = [x509.IPAddress(ip)]
    except ValueError:
        san = [x509.DNSName(server)]
    server_cert, server_key = leaf(server, ExtendedKeyUsageOID.SERVER_AUTH, san)
    client_cert, client_key = leaf("dmmig source", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    _write(directory, {CA: _pem(ca), SERVER_CERT: _pem(server_cert), SERVER_KEY: _key_pem(server_key),
                       CLIENT_CERT: _pem(client_cert), CLIENT_KEY: _key_pem(client_key)})


def server_files(directory: str) -> dict[str, str]:
    """What the destination's qemu-nbd needs (the server's key among them: never log it)."""
    out = {}
    for f in SERVER_FILES:
        with open(os.path.join(directory, f)) as fh:
            out[f] = fh.read()
    return out


def write_server(directory: str, files: dict[str, str]) -> None:
    """The destination's side: exactly the server's files, into a root-only DIRECTORY."""
    if set(files) != set(SERVER_FILES) or not all(isinstance(v, str) and "-----BEGIN " in v for v in files.values()):
        raise BadInput(f"TLS credentials must be exactly {', '.join(SERVER_FILES)} in PEM")
    _write(directory, files)


def remove(directory: str) -> bool:
    if not os.path.lexists(directory):
        return False
    shutil.rmtree(directory)
    return True


def _write(directory: str, files: dict[str, str]) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for f, text in files.items():
        p = os.path.join(directory, f)
        fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(p + ".tmp", p)


def _pem(cert: object) -> str:
    from cryptography.hazmat.primitives import serialization
    return str(cert.public_bytes(serialization.Encoding.PEM).decode())  # type: ignore[attr-defined]


def _key_pem(key: object) -> str:
    from cryptography.hazmat.primitives import serialization
    return str(key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                 serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())
