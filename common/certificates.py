"""A local certificate authority and the certificates it signs, for development and tests.

:func:`create_development_tls` writes, into one folder::

    ca.pem  ca.key            the certificate authority
    server.pem  server.key    valid for localhost, 127.0.0.1 and ::1, and any names given
    client.pem  client.key    a client certificate, for servers that require one

Keys are ECDSA P-256 and are written readable by their owner only. These files suit a laptop or
a test; a deployment should take its certificates from the organization's own CA.
"""

import dataclasses
import datetime
import ipaddress
import logging
import os
import pathlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevelopmentTls", "create_development_tls"]

logger = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=825)
LEAF_VALIDITY = datetime.timedelta(days=397)
DEFAULT_HOSTNAMES = ("localhost",)
DEFAULT_ADDRESSES = ("127.0.0.1", "::1")


@dataclasses.dataclass(frozen=True)
class DevelopmentTls:
    """Paths of the files that :func:`create_development_tls` writes."""

    folder: pathlib.Path

    @property
    def ca_cert(self) -> pathlib.Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> pathlib.Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> pathlib.Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> pathlib.Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> pathlib.Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> pathlib.Path:
        return self.folder / "client.key"

    def exists(self) -> bool:
        """Return whether every file is present."""
        return all(
            path.is_file()
            for path in (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key)
        )


def create_development_tls(
    folder: pathlib.Path,
    *,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    addresses: Sequence[str] = DEFAULT_ADDRESSES,
    overwrite: bool = False,
) -> DevelopmentTls:
    """Create a certificate authority and a server and a client certificate signed by it.

    Parameters
    ----------
    folder : pathlib.Path
        Where the files go; created with mode 0700 if missing.
    hostnames : sequence of str
        DNS names the server certificate is valid for. Default ``("localhost",)``.
    addresses : sequence of str
        IP addresses the server certificate is valid for. Default ``("127.0.0.1", "::1")``.
    overwrite : bool
        Replace existing files. Default False, which keeps a complete set as it is.

    Returns
    -------
    DevelopmentTls
        The paths of the files.

    Raises
    ------
    ValueError
        If an address is not an IP address.
    """
    tls = DevelopmentTls(pathlib.Path(folder))
    if tls.exists() and not overwrite:
        logger.info("Keeping the development certificates in %s", tls.folder)
        return tls
    ip_addresses = []
    for address in addresses:
        try:
            ip_addresses.append(ipaddress.ip_address(address))
        except ValueError as error:
            raise ValueError(f"{address!r} is not an IP address; give names such as 'localhost' as hostnames.") from error
    tls.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LasagneEngine development CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_names: list[x509.GeneralName] = [x509.DNSName(name) for name in hostnames]
    server_names += [x509.IPAddress(address) for address in ip_addresses]
    server_key, server_cert = _leaf(
        ca_key, ca_cert, "LasagneEngine server", now, ExtendedKeyUsageOID.SERVER_AUTH, server_names
    )
    client_key, client_cert = _leaf(
        ca_key, ca_cert, "LasagneEngine client", now, ExtendedKeyUsageOID.CLIENT_AUTH, []
    )

    _write_key(tls.ca_key, ca_key)
    _write_cert(tls.ca_cert, ca_cert)
    _write_key(tls.server_key, server_key)
    _write_cert(tls.server_cert, server_cert)
    _write_key(tls.client_key, client_key)
    _write_cert(tls.client_cert, client_cert)
    logger.info(
        "Created a development CA and certificates in %s; the server certificate is valid for %s",
        tls.folder,
        ", ".join([*hostnames, *addresses]),
    )
    return tls


def _builder(subject, issuer, public_key, now: datetime.datetime, validity: datetime.timedelta):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour of slack, so a clock slightly behind still accepts a certificate made just now.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + validity)
    )


def _leaf(ca_key, ca_cert, common_name: str, now, usage, names: list[x509.GeneralName]):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), now, LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_key(path: pathlib.Path, key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # A new file created with mode 0600, so the key is never readable by others, even briefly.
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)


def _write_cert(path: pathlib.Path, cert) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
