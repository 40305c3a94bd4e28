"""`vramancer keys init | show | trust | revoke | list`: files with 0600 permissions, fingerprints
as hex groups, bad input in one line with exit 2."""
from __future__ import annotations

import hashlib
import json
import stat

import pytest

from vramancer.cli import main

pytest.importorskip("cryptography")


@pytest.fixture
def keys_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    return tmp_path / "cfg" / "keys"


def test_init_show_trust_revoke_list(keys_home, capsys):
    assert main(["keys", "init", "--name", "node-1"]) == 0
    out = capsys.readouterr().out
    for f in ("node.key", "node.crt"):
        assert stat.S_IMODE((keys_home / f).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_home.stat().st_mode) == 0o700

    assert main(["keys", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    fp = shown["fingerprint"]
    assert fp in out and len(fp) == 79 and fp.count(":") == 15

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((keys_home / "node.crt").read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fp.replace(":", "") == hashlib.sha256(spki).hexdigest()

    peer = "AB" * 32
    assert main(["keys", "trust", peer]) == 0
    assert main(["keys", "list", "--json"]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["trusted"] == [":".join(["abab"] * 16)] and listed["revoked"] == []
    assert stat.S_IMODE((keys_home / "trust.json").stat().st_mode) == 0o600
    assert main(["keys", "revoke", ":".join(["abab"] * 16)]) == 0
    assert main(["keys", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "revoked  " + ":".join(["abab"] * 16)


def test_bad_input_is_one_line_exit_2(keys_home, capsys):
    assert main(["keys", "trust", "not-a-fingerprint"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a fingerprint" in err
    assert main(["keys", "show"]) == 2
    assert "vramancer keys init" in capsys.readouterr().err
    assert main(["keys", "init"]) == 0
    assert main(["keys", "init"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["keys", "init", "--force"]) == 0


def test_a_key_readable_by_others_is_refused(keys_home, capsys):
    assert main(["keys", "init"]) == 0
    (keys_home / "node.key").chmod(0o644)
    assert main(["keys", "show"]) == 1
    assert "chmod 600" in capsys.readouterr().err
