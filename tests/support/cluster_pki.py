"""Certificates and kubeconfigs for the local test control plane, made with the `openssl` command line.

One throw-away CA signs the apiserver's serving certificate and the client certificates (the apiserver
authenticates clients by certificate: CN is the user name, O the groups). EC P-256 keys keep generation
fast. The service-account signing key pair is separate from the CA.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

_DAYS = "30"


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")


def _ec_key(path: Path) -> None:
    _openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        str(path),
        cwd=path.parent,
    )


def make_ca(directory: Path, name: str = "moefleet-test-ca") -> CertPair:
    """A self-signed CA certificate + key in `directory`."""
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    _ec_key(pair.key)
    _openssl(
        "req", "-x509", "-new", "-key", str(pair.key), "-out", str(pair.cert), "-days", _DAYS,
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=directory,
    )  # fmt: skip
    return pair


def make_cert(
    directory: Path,
    ca: CertPair,
    name: str,
    common_name: str,
    *,
    organizations: tuple[str, ...] = (),
    server_names: tuple[str, ...] = (),
    server_ips: tuple[str, ...] = (),
) -> CertPair:
    """A leaf certificate signed by `ca`: a server cert when names/IPs are given, else a client cert."""
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    _ec_key(pair.key)
    subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
    csr = directory / f"{name}.csr"
    _openssl("req", "-new", "-key", str(pair.key), "-out", str(csr), "-subj", subject, cwd=directory)
    server = bool(server_names or server_ips)
    ext = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}",
    ]
    if server:
        sans = [f"DNS:{n}" for n in server_names] + [f"IP:{ip}" for ip in server_ips]
        ext.append("subjectAltName=" + ",".join(sans))
    extfile = directory / f"{name}.ext"
    extfile.write_text("\n".join(ext) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-out", str(pair.cert), "-days", _DAYS, "-extfile", str(extfile),
        cwd=directory,
    )  # fmt: skip
    return pair


def make_service_account_keys(directory: Path) -> CertPair:
    """The service-account token signing key (`key`) and its public half (`cert` holds the public key)."""
    pair = CertPair(directory / "sa.pub", directory / "sa.key")
    _ec_key(pair.key)
    _openssl("pkey", "-in", str(pair.key), "-pubout", "-out", str(pair.cert), cwd=directory)
    return pair


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, client: CertPair, user: str) -> Path:
    """A kubeconfig with everything embedded, so the file can be copied anywhere while the plane runs."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "moefleet-test", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": _b64(client.cert), "client-key-data": _b64(client.key)},
            }
        ],
        "contexts": [{"name": user, "context": {"cluster": "moefleet-test", "user": user}}],
        "current-context": user,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
