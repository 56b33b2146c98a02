"""Test PKI: one CA for the whole look-alike cloud, server certificates for the broker and the
artifact store (localhost / 127.0.0.1), and one client certificate per thing (CN = thing name),
written out as PEM files the way AWS IoT hands them to a Greengrass core."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class ClientCert:
    """The files of one identity: certificate and private key (PEM)."""
    name: str
    cert: Path
    key: Path


class Pki:
    """A certificate authority that writes its certificates under `directory`."""

    def __init__(self, directory: Path, org: str = "ggc-ota look-alike") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(key_type=trustme.KeyType.RSA, organization_name=org)
        self.ca_path = self.dir / "AmazonRootCA1.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self._clients: dict[str, ClientCert] = {}
        self.server = self._issue_server("server")

    def _issue_server(self, name: str) -> ClientCert:
        leaf = self._ca.issue_cert("localhost", "127.0.0.1", common_name="localhost",
                                   key_type=trustme.KeyType.RSA)
        return self._write(name, leaf)

    def _write(self, name: str, leaf: trustme.LeafCert) -> ClientCert:
        cert = self.dir / f"{name}.cert.pem"
        key = self.dir / f"{name}.private.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
        return ClientCert(name, cert, key)

    def client(self, name: str) -> ClientCert:
        """The certificate of thing (or service) `name`, issued on first use."""
        if name not in self._clients:
            leaf = self._ca.issue_cert(f"{name}.things.local", common_name=name,
                                       key_type=trustme.KeyType.RSA)
            self._clients[name] = self._write(name, leaf)
        return self._clients[name]
