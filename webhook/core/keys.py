"""Signing keys: Ed25519 or ECDSA P-256, stored as PEM, identified by the SHA-256 of their SPKI DER."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from webhook.core.errors import InvalidInput

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
ALGORITHMS = ("ed25519", "ecdsa-p256")


class InvalidKey(InvalidInput):
    """A key is missing, unreadable or of an unsupported type; the message names where it came from."""


@dataclass(frozen=True)
class VerifyingKey:
    key_id: str
    algorithm: str
    public_key: PublicKey

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            if isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, message)
            else:
                self.public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class SigningKey:
    verifying: VerifyingKey
    private_key: PrivateKey

    @property
    def key_id(self) -> str:
        return self.verifying.key_id

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(message)
        # DER-encoded ECDSA signatures, as securesystemslib and sigstore tooling expect.
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))


def key_id_of(public_key: PublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _algorithm_of(public_key: object) -> str:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    raise InvalidKey("unsupported key type: use Ed25519 or ECDSA P-256")


def verifying_key(public_key: object) -> VerifyingKey:
    algorithm = _algorithm_of(public_key)
    assert isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    return VerifyingKey(key_id=key_id_of(public_key), algorithm=algorithm, public_key=public_key)


def generate(algorithm: str = "ed25519") -> SigningKey:
    private: PrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise InvalidKey(f"unknown algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    return SigningKey(verifying_key(private.public_key()), private)


def private_pem(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_private_key(data: bytes, where: str) -> SigningKey:
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidKey(f"{where}: not an unencrypted PEM private key") from exc
    if not isinstance(private, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise InvalidKey(f"{where}: unsupported key type: use Ed25519 or ECDSA P-256")
    try:
        return SigningKey(verifying_key(private.public_key()), private)
    except InvalidKey as exc:
        raise InvalidKey(f"{where}: {exc}") from exc


def parse_public_key(data: bytes, where: str) -> VerifyingKey:
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InvalidKey(f"{where}: not a PEM public key") from exc
    try:
        return verifying_key(public)
    except InvalidKey as exc:
        raise InvalidKey(f"{where}: {exc}") from exc


def parse_any_key(data: bytes, where: str) -> VerifyingKey:
    """The public half of a PEM file that holds either a public or a private key."""
    if b"PRIVATE KEY" in data:
        return parse_private_key(data, where).verifying
    return parse_public_key(data, where)
