"""Certificates and kubeconfigs of the local cluster, generated with `cryptography`.

One CA signs every serving and client certificate; identities follow Kubernetes' conventions
(system:node:<name> in system:nodes, system:kube-controller-manager...) so the Node and RBAC
authorizers apply their built-in rules. ECDSA P-256 keys: fast to generate, accepted everywhere.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class Identity:
    file: str  # <file>.crt / <file>.key in the PKI directory
    common_name: str
    organizations: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ()  # DNS names and IP addresses; makes it a serving cert
    client: bool = True


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
    )


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def ensure(pki_dir: Path, identities: list[Identity]) -> None:
    """Create the CA, the service-account key pair and each missing identity's certificate."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key_path = pki_dir / "ca.crt", pki_dir / "ca.key"
    if not ca_crt.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = _name("voicefleet-local-ca")
        cert = (
            _builder(subject, subject, ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        ca_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_key_loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    assert isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey)

    if not (pki_dir / "sa.key").exists():
        sa_key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki_dir / "sa.key", sa_key)
        (pki_dir / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    for ident in identities:
        crt_path = pki_dir / f"{ident.file}.crt"
        if crt_path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if ident.client else []
        if ident.server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            _builder(
                _name(ident.common_name, ident.organizations), ca_cert.subject, key.public_key()
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if ident.server_names:
            builder = builder.add_extension(_san(ident.server_names), critical=False)
        cert = builder.sign(ca_key_loaded, hashes.SHA256())
        _write_key(pki_dir / f"{ident.file}.key", key)
        crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_kubeconfig(path: Path, pki_dir: Path, identity: str, server: str) -> None:
    """A self-contained kubeconfig (certificates embedded) for one client identity."""

    def b64(name: str) -> str:
        return base64.b64encode((pki_dir / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "voicefleet",
                "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": identity,
                "user": {
                    "client-certificate-data": b64(f"{identity}.crt"),
                    "client-key-data": b64(f"{identity}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "voicefleet", "context": {"cluster": "voicefleet", "user": identity}}
        ],
        "current-context": "voicefleet",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
