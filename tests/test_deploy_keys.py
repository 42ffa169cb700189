"""The deployment's key material (deploy/gen-certs.sh, deploy/gen-node-key.sh): the operator's script makes
the CA and the SuperLink certificate only, never a node key, and never replaces an existing CA; a server
certificate renews from the same CA; an organization's node key is written 0600 and never overwritten.
Seconds: openssl and ssh-keygen only, no Flower process."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen"
)


def _run(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / script), *map(str, args)], capture_output=True, text=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def _made_once(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    done = _run("gen-certs.sh", out, "link.example.org,10.0.0.5")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture()
def certs(tmp_path, _made_once) -> Path:
    """A fresh copy of one gen-certs.sh output (RSA-4096 keys take a while to make)."""
    out = tmp_path / "certs"
    shutil.copytree(_made_once, out)
    return out


def test_gen_certs_writes_the_ca_and_the_server_certificate_and_no_node_key(certs):
    names = {p.name for p in certs.iterdir()}
    assert {"ca.key", "ca.crt", "server.key", "server.pem"} <= names
    assert not [n for n in names if n.startswith("supernode") or n.endswith(".pub")], names
    assert names - {"ca.key", "ca.crt", "server.key", "server.pem", "ca.srl"} == set()
    for private in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / private).stat().st_mode) == 0o600
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "server.pem"], cwd=certs, capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", certs / "server.pem", "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:link.example.org", "IP Address:10.0.0.5"):
        assert name in text


def test_gen_certs_refuses_an_existing_ca_and_leaves_it_byte_identical(certs):
    before = _snapshot(certs)
    for args in ((certs, "link.example.org"), (certs, "other.example.org,10.0.0.9")):
        done = _run("gen-certs.sh", *args)
        assert done.returncode != 0
        assert "ca.key" in done.stderr and "--renew-server" in done.stderr
    assert _snapshot(certs) == before
    # a CA with only its certificate left is refused too, naming that file
    (certs / "ca.key").unlink()
    done = _run("gen-certs.sh", certs, "link.example.org")
    assert done.returncode != 0 and "ca.crt" in done.stderr
    assert (certs / "ca.crt").read_bytes() == before["ca.crt"]


def test_gen_certs_no_longer_takes_a_node_count(tmp_path):
    out = tmp_path / "certs"
    done = _run("gen-certs.sh", out, "localhost", "3")
    assert done.returncode != 0 and "gen-node-key.sh" in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_renew_server_issues_a_new_certificate_from_the_same_ca(certs):
    before = _snapshot(certs)
    done = _run("gen-certs.sh", "--renew-server", certs, "link.example.org,10.0.0.5")
    assert done.returncode == 0, done.stderr
    after = _snapshot(certs)
    assert after["ca.key"] == before["ca.key"] and after["ca.crt"] == before["ca.crt"]
    assert after["server.pem"] != before["server.pem"] and after["server.key"] != before["server.key"]
    assert stat.S_IMODE((certs / "server.key").stat().st_mode) == 0o600
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "server.pem"], cwd=certs, capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the new certificate goes with the new key
    pubs = [
        subprocess.run(cmd, cwd=certs, capture_output=True, check=True).stdout
        for cmd in (
            ["openssl", "x509", "-in", "server.pem", "-noout", "-pubkey"],
            ["openssl", "pkey", "-in", "server.key", "-pubout"],
        )
    ]
    assert pubs[0] == pubs[1]


def test_renew_server_needs_the_ca(tmp_path):
    out = tmp_path / "certs"
    done = _run("gen-certs.sh", "--renew-server", out, "localhost")
    assert done.returncode != 0 and "ca.key" in done.stderr
    assert not (out / "server.pem").exists()


def test_gen_node_key_writes_a_0600_key_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "org"
    done = _run("gen-node-key.sh", out, "supernode-0")
    assert done.returncode == 0, done.stderr
    assert "send only supernode-0.pub to the operator; supernode-0.key never leaves this machine" in done.stdout
    key, pub = out / "supernode-0.key", out / "supernode-0.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert sorted(p.name for p in out.iterdir()) == ["supernode-0.key", "supernode-0.pub"]
    # the key pair is one: the public half derives from the private one
    derived = subprocess.run(["ssh-keygen", "-y", "-f", key], capture_output=True, text=True, check=True).stdout
    assert derived.split()[:2] == pub.read_text().split()[:2]

    before = _snapshot(out)
    again = _run("gen-node-key.sh", out, "supernode-0")
    assert again.returncode != 0 and "supernode-0.key" in again.stderr and "overwrite" in again.stderr
    assert _snapshot(out) == before
    # a leftover public half alone also blocks the name
    key.unlink()
    again = _run("gen-node-key.sh", out, "supernode-0")
    assert again.returncode != 0 and "supernode-0.pub" in again.stderr
    assert not key.exists() and pub.read_bytes() == before["supernode-0.pub"]


def test_gen_node_key_refuses_a_name_that_is_a_path(tmp_path):
    for name in ("../x", "a/b", "", ".hidden"):
        done = _run("gen-node-key.sh", tmp_path, name)
        assert done.returncode != 0, name
    assert not any(tmp_path.iterdir())


def test_the_superlink_start_script_reads_the_cert_dir_from_systemd_credentials(tmp_path, certs):
    """CERT_DIR '-' is $CREDENTIALS_DIRECTORY (the unit's LoadCredential=): checked without starting Flower, by a
    stand-in flower-superlink first on PATH that prints its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flower-superlink").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake / "flower-superlink").chmod(0o755)
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        shutil.copy(certs / name, creds / name)
    # the script puts the venv first on PATH: run a copy of it next to an empty .venv/bin instead
    root = tmp_path / "repo"
    (root / "deploy").mkdir(parents=True)
    (root / ".venv").mkdir()
    (root / ".venv" / "bin").symlink_to(fake)
    shutil.copy(DEPLOY / "start-superlink.sh", root / "deploy" / "start-superlink.sh")
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    env.pop("DPFPL_INSECURE", None)
    script = root / "deploy" / "start-superlink.sh"
    done = subprocess.run(["bash", script, "-", "127.0.0.1", "8123"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = done.stdout.split()
    assert args[args.index("--ssl-keyfile") + 1] == str(creds / "server.key")
    assert "--enable-supernode-auth" in args
    assert done.stderr == ""  # loopback, only the three files: nothing to warn about
    # the operator's directory (with ca.key) on a public address: both warnings
    done = subprocess.run(["bash", script, certs, "0.0.0.0", "8123"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ca.key" in done.stderr and "docs/control-api.md" in done.stderr
    # no CERT_DIR and no credentials: a usage error, not a SuperLink without certificates
    env.pop("CREDENTIALS_DIRECTORY")
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert done.returncode == 2
