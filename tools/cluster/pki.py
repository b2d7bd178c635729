"""Certificates and kubeconfigs of the single-node cluster: one CA signs every serving and client cert."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tools.cluster import config

VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Identity:
    """A client certificate: the user (CN) and groups (O) the API server sees."""

    file: str
    user: str
    groups: tuple[str, ...] = ()


CLIENTS = (
    Identity("admin", "admin", ("system:masters",)),
    Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
    Identity("controller-manager", "system:kube-controller-manager"),
    Identity("scheduler", "system:kube-scheduler"),
    Identity("kubelet", f"system:node:{config.NODE_NAME}", ("system:nodes",)),
    Identity("kube-proxy", "system:kube-proxy"),
    Identity("coredns", "system:coredns"),
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / name

    def generate(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        ca_key = _key()
        ca_name = _name("promotion-gate node CA")
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + VALIDITY)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        _write(self.path("ca.crt"), ca.public_bytes(serialization.Encoding.PEM))
        _write(self.path("ca.key"), _pem_key(ca_key), private=True)

        def issue(file: str, subject: x509.Name, *, server: Sequence[str] = (), client: bool = False) -> None:
            key = _key()
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
            if server:
                usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now).not_valid_after(now + VALIDITY)
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                       .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
            if server:
                names: list[x509.GeneralName] = []
                for entry in server:
                    try:
                        names.append(x509.IPAddress(ipaddress.ip_address(entry)))
                    except ValueError:
                        names.append(x509.DNSName(entry))
                builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            _write(self.path(f"{file}.crt"), cert.public_bytes(serialization.Encoding.PEM))
            _write(self.path(f"{file}.key"), _pem_key(key), private=True)

        domain = config.CLUSTER_DOMAIN
        issue("apiserver", _name("kube-apiserver"), server=[
            config.NODE_IP, config.KUBERNETES_SERVICE_IP, "127.0.0.1", "localhost", "kubernetes",
            "kubernetes.default", "kubernetes.default.svc", f"kubernetes.default.svc.{domain}"])
        issue("kubelet-serving", _name(f"system:node:{config.NODE_NAME}", ["system:nodes"]),
              server=[config.NODE_IP, config.NODE_NAME])
        for identity in CLIENTS:
            issue(identity.file, _name(identity.user, identity.groups), client=True)
        sa_key = _key()
        _write(self.path("sa.key"), _pem_key(sa_key), private=True)
        _write(self.path("sa.pub"), sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def kubeconfig(self, identity: str, destination: Path, server: str | None = None) -> Path:
        """A kubeconfig with embedded credentials (the kubelet and friends need absolute, self-contained files)."""

        def b64(name: str) -> str:
            return base64.b64encode(self.path(name).read_bytes()).decode()

        document = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "node", "cluster": {
                "server": server or f"https://{config.NODE_IP}:{config.APISERVER_PORT}",
                "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": identity, "user": {"client-certificate-data": b64(f"{identity}.crt"),
                                                  "client-key-data": b64(f"{identity}.key")}}],
            "contexts": [{"name": "node", "context": {"cluster": "node", "user": identity}}],
            "current-context": "node",
            "preferences": {},
        }
        destination.write_text(yaml.safe_dump(document, sort_keys=False))
        destination.chmod(0o600)
        return destination
