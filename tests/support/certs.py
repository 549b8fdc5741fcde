"""Certificates for the TLS tests, made with the ``openssl`` command line: two CAs (the site's and a "wrong" one)
and leaf certificates signed by either, each valid for localhost and 127.0.0.1, for server and client use.

ECDSA P-256 keys (BCP 195 suites; RSA key generation would take seconds on a slow machine).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .dicom_tools import require_tool

KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")

LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(args)}:\n{proc.stderr}"


@dataclass(frozen=True)
class CertificateAuthority:
    name: str
    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @classmethod
    def create(cls, directory: Path, name: str) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(name, directory)
        _openssl("req", "-x509", *KEY, "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert),
                 "-days", "2", "-subj", f"/CN={name} test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return ca

    def issue(self, name: str) -> KeyPair:
        """A leaf certificate for ``name`` (server and client use, localhost and 127.0.0.1) signed by this CA."""
        pair = KeyPair(self.directory / f"{name}.key", self.directory / f"{name}.pem")
        csr = self.directory / f"{name}.csr"
        ext = self.directory / "leaf.ext"
        ext.write_text(LEAF_EXTENSIONS)
        _openssl("req", *KEY, "-nodes", "-keyout", str(pair.key), "-out", str(csr),
                 "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext))
        return pair


@dataclass(frozen=True)
class TestCertificates:
    """The site's CA with the node's, a modality's and a PACS's certificates; a wrong CA with a modality's and a
    PACS's that the site must refuse."""

    __test__ = False  # not a pytest test class

    ca: CertificateAuthority
    node: KeyPair
    modality: KeyPair
    pacs: KeyPair
    wrong_ca: CertificateAuthority
    wrong_modality: KeyPair
    wrong_pacs: KeyPair


def make_certificates(directory: Path) -> TestCertificates:
    ca = CertificateAuthority.create(directory / "site", "site")
    wrong = CertificateAuthority.create(directory / "wrong", "wrong")
    return TestCertificates(ca=ca, node=ca.issue("node"), modality=ca.issue("modality"), pacs=ca.issue("pacs"),
                            wrong_ca=wrong, wrong_modality=wrong.issue("modality"), wrong_pacs=wrong.issue("pacs"))
