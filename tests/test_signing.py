"""Bundle signatures (issue 21 item 5): hashes prove integrity, signatures prove who made a bundle."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medclf import bundle as bundle_mod
from medclf.bundle import load_bundle, save_bundle, sign_bundle, update_bundle, verify_bundle, zip_bundle
from medclf.errors import BundleError, ConfigError
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec
from medclf.signing import SIGNATURES, TrustedKeys, generate_key_pair, load_private_key, load_public_key

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def medclf(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "medclf", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    manifest = {
        "model": {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": 2},
        "classes": ["normal", "tumour", "oedema"],
        "preprocess": PreprocessSpec(size=(16, 16)).to_dict(),
    }
    model = create_model("compact-s", 1, 3, 2)
    return save_bundle(
        tmp_path / "model", model=model, manifest=manifest, extra_files={"MODEL_CARD.md": "# Card\n"}
    )


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """Two key pairs, and a trusted-keys folder holding only alice's public key."""
    out = {}
    for name in ("alice", "mallory"):
        out[name], out[f"{name}.pub"] = generate_key_pair(tmp_path / "keys" / name)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(out["alice.pub"], trusted / "alice.pub")
    out["trusted"] = trusted
    return out


def _swap_classes_and_reseal(path: Path) -> None:
    """The attack: swap two class names and recompute bundle.json's hash (every file hash still matches)."""
    m = json.loads((path / "bundle.json").read_text())
    m["classes"] = ["tumour", "normal", "oedema"]
    m["self_sha256"] = bundle_mod._SELF_PLACEHOLDER
    (path / "bundle.json").write_bytes(bundle_mod._seal(m))


def test_a_tampered_bundle_with_recomputed_hashes_is_refused_under_trusted_keys(bundle_dir, keys):
    sign_bundle(bundle_dir, keys["alice"])
    assert load_bundle(bundle_dir, trusted_keys=keys["trusted"]).signatures[0].trusted_as == "alice.pub"
    _swap_classes_and_reseal(bundle_dir)
    b = load_bundle(bundle_dir)  # integrity alone cannot tell: "all hashes verified"
    assert b.classes[0] == "tumour"
    assert not b.signatures[0].valid and "made for another bundle" in b.signatures[0].problem
    with pytest.raises(BundleError, match="no valid signature by a trusted key") as info:
        load_bundle(bundle_dir, trusted_keys=keys["trusted"])
    assert "INVALID, made for another bundle" in str(info.value) and "\n" not in str(info.value)
    # Re-signing the tampered bundle with an untrusted key does not help.
    sign_bundle(bundle_dir, keys["mallory"], signer="alice")
    with pytest.raises(BundleError, match=r"'alice' .*valid, but the key is NOT among the trusted keys"):
        load_bundle(bundle_dir, trusted_keys=keys["trusted"])


def test_signing_leaves_the_hash_alone_and_allows_several_signers(bundle_dir, keys, tmp_path):
    before = verify_bundle(bundle_dir)["self_sha256"]
    unsigned = load_bundle(bundle_dir)
    assert unsigned.signatures == [] and unsigned.signature_summary() == "unsigned"
    sign_bundle(bundle_dir, keys["mallory"])
    sign_bundle(bundle_dir, keys["alice"], signer="Alice Martin (radiology)")
    sign_bundle(bundle_dir, keys["alice"], signer="Alice Martin (radiology)")  # replaces, not duplicates
    assert verify_bundle(bundle_dir)["self_sha256"] == before
    b = load_bundle(bundle_dir, trusted_keys=keys["trusted"], expected_sha256=before.upper())
    assert [(s.signer, s.valid, s.trusted_as) for s in b.signatures] == [
        ("mallory", True, None),
        ("Alice Martin (radiology)", True, "alice.pub"),
    ]
    # Removing signatures never breaks the hash check; without trust an unsigned bundle still works.
    (bundle_dir / SIGNATURES).unlink()
    assert load_bundle(bundle_dir).sha256 == before
    with pytest.raises(BundleError, match="it is not signed"):
        load_bundle(bundle_dir, trusted_keys=keys["trusted"])
    # update_bundle makes a new bundle (new sha256): the old signatures do not travel with it.
    sign_bundle(bundle_dir, keys["alice"])
    update_bundle(bundle_dir, {"metrics": {"test": {"auc": 0.9}}})
    assert not (bundle_dir / SIGNATURES).exists()


def test_a_signature_copied_from_another_bundle_or_altered_fails(bundle_dir, keys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bundle_dir, other)
    _swap_classes_and_reseal(other)
    sign_bundle(other, keys["alice"])
    shutil.copy(other / SIGNATURES, bundle_dir / SIGNATURES)
    check = load_bundle(bundle_dir).signatures[0]
    assert not check.valid and "made for another bundle" in check.problem
    # The same signature with the sha256 field edited to this bundle's: the signature no longer verifies.
    doc = json.loads((bundle_dir / SIGNATURES).read_text())
    doc["signatures"][0]["bundle_sha256"] = verify_bundle(bundle_dir)["self_sha256"]
    (bundle_dir / SIGNATURES).write_text(json.dumps(doc))
    check = load_bundle(bundle_dir).signatures[0]
    assert not check.valid and "does not verify" in check.problem
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(bundle_dir, trusted_keys=keys["trusted"])
    (bundle_dir / SIGNATURES).write_text("[" * 10 + "]" * 10)
    with pytest.raises(BundleError, match=r"signatures\.json is not a medclf signature file"):
        load_bundle(bundle_dir)


def test_pinned_sha256(bundle_dir):
    sha = load_bundle(bundle_dir).sha256
    assert load_bundle(bundle_dir, expected_sha256=sha).sha256 == sha
    with pytest.raises(BundleError, match="expected"):
        load_bundle(bundle_dir, expected_sha256="a" * 64)
    with pytest.raises(ConfigError, match="64 hexadecimal digits"):
        load_bundle(bundle_dir, expected_sha256="abc")


def test_signed_zip(bundle_dir, keys, tmp_path):
    z = zip_bundle(bundle_dir, tmp_path / "model.zip")
    sign_bundle(z, keys["alice"])
    b = load_bundle(z, trusted_keys=keys["trusted"])
    assert b.sha256 == load_bundle(bundle_dir).sha256 and b.signatures[0].trusted_as == "alice.pub"
    b.close()


def test_key_formats(tmp_path, bundle_dir, keys):
    alice = load_private_key(keys["alice"])
    raw_pub = alice.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    folder = tmp_path / "formats"
    folder.mkdir()
    (folder / "hex.pub").write_text(raw_pub.hex() + "\n")
    (folder / "ssh.pub").write_bytes(
        alice.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b" alice@clinic\n"
    )
    (folder / "README.txt").write_text("not a key: ignored")
    assert len(TrustedKeys.load(folder)) == 1  # both files hold the same key
    raw_private = tmp_path / "raw.key"
    raw_private.write_text(
        base64.b64encode(
            alice.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        ).decode()
    )
    sign_bundle(bundle_dir, raw_private, signer="alice")
    assert load_bundle(bundle_dir, trusted_keys=folder / "ssh.pub").signatures[0].trusted_as == "ssh.pub"
    # Mistakes get one line: a private key among the trusted keys, an empty folder, a wrong key type.
    shutil.copy(keys["alice"], folder / "oops.pem")
    with pytest.raises(ConfigError, match="is a private key"):
        TrustedKeys.load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no public key files"):
        TrustedKeys.load(empty)
    with pytest.raises(ConfigError, match="is a public key"):
        load_private_key(keys["alice.pub"])
    with pytest.raises(ConfigError, match="not a readable Ed25519 public key"):
        load_public_key(folder / "README.txt")


def test_passphrase_protected_key(tmp_path, bundle_dir, monkeypatch):
    monkeypatch.setenv("MEDCLF_KEY_PASSPHRASE", "correct horse")
    private, public = generate_key_pair(tmp_path / "bob")
    assert b"ENCRYPTED" in private.read_bytes()
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    sign_bundle(bundle_dir, private)
    monkeypatch.delenv("MEDCLF_KEY_PASSPHRASE")
    with pytest.raises(ConfigError, match="MEDCLF_KEY_PASSPHRASE"):
        load_private_key(private)
    assert load_bundle(bundle_dir, trusted_keys=public).signatures[0].trusted
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_key_pair(tmp_path / "bob")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``medclf ARGS`` in this process (a subprocess costs seconds of imports): (exit code, out, err)."""
    from medclf.cli import main

    def run(*args):
        threads = torch.get_num_threads()  # serve sets the process's torch threads before loading
        monkeypatch.setattr(sys, "argv", ["medclf", *map(str, args)])
        try:
            with pytest.raises(SystemExit) as exit_:
                main()
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return exit_.value.code, out.out, out.err

    return run


def test_cli_keygen_sign_info_predict(bundle_dir, tmp_path, sim_data, cli):
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    rc, out, _ = cli("keygen", tmp_path / "k" / "alice")
    assert rc == 0 and out.startswith("key ")
    shutil.copy(tmp_path / "k" / "alice.pub", trusted)
    rc, _, err = cli("info", bundle_dir, "--trusted-keys", trusted)
    assert rc == 2 and "it is not signed" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli("sign", bundle_dir, "--key", tmp_path / "k" / "alice.key", "--signer", "Dr Alice")
    assert rc == 0, err
    rc, out, _ = cli("info", bundle_dir, "--trusted-keys", trusted)
    assert rc == 0 and "'Dr Alice'" in out and "trusted key alice.pub" in out
    sha = load_bundle(bundle_dir).sha256
    image = sorted((sim_data / "test").rglob("*.png"))[0]
    rc, out, _ = cli("predict", bundle_dir, image, "--trusted-keys", trusted, "--bundle-sha256", sha)
    assert rc == 0 and json.loads(out)[0]["predicted"]
    rc, _, err = cli("predict", bundle_dir, image, "--bundle-sha256", "f" * 64)
    assert rc == 2 and "expected ffff" in err
    _swap_classes_and_reseal(bundle_dir)
    rc, out, _ = cli("info", bundle_dir)
    assert rc == 0 and "all 2 file hashes verified" in out and "INVALID, made for another bundle" in out
    rc, _, err = cli("predict", bundle_dir, image, "--trusted-keys", trusted)
    assert rc == 2 and "no valid signature by a trusted key" in err and len(err.strip().splitlines()) == 1
    # The real command line: exit code 2, one line, no traceback.
    proc = medclf("info", bundle_dir, "--trusted-keys", trusted)
    assert proc.returncode == 2 and "no valid signature by a trusted key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["evaluate", "serve", "dicom-node"])
def test_cli_other_commands_refuse_an_untrusted_bundle(bundle_dir, keys, tmp_path, command, cli):
    # The bundle is refused before anything else happens (no data read, no port opened).
    extra = {"evaluate": [tmp_path / "data"], "serve": [], "dicom-node": ["--out", tmp_path / "out"]}[command]
    rc, _, err = cli(command, bundle_dir, *extra, "--trusted-keys", keys["trusted"])
    assert rc == 2 and "it is not signed" in err, err
    rc, _, err = cli(command, bundle_dir, *extra, "--bundle-sha256", "0" * 64)
    assert rc == 2 and "integrity check failed: bundle sha256 is" in err, err


def test_the_server_shows_who_signed_what_it_runs(bundle_dir, keys, tmp_path):
    from medclf.serve.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    sign_bundle(bundle_dir, keys["alice"], signer="Dr Alice")
    app = create_app(bundle_dir, audit_db=str(tmp_path / "audit.db"), trusted_keys=str(keys["trusted"]))
    with TestClient(app) as client:
        doc = client.get("/v1/model").json()
    assert doc["signatures"]["trust_checked"] is True
    (entry,) = doc["signatures"]["entries"]
    assert entry["signer"] == "Dr Alice" and entry["trusted"] and entry["trusted_key"] == "alice.pub"
    assert "trusted key alice.pub" in doc["model_card"]["facts"]["signed by"]  # the page lists the facts
    assert "trusted key alice.pub" in doc["signatures"]["summary"]
    _swap_classes_and_reseal(bundle_dir)
    with pytest.raises(BundleError, match="no valid signature by a trusted key"):
        create_app(bundle_dir, audit_db=str(tmp_path / "audit.db"), trusted_keys=str(keys["trusted"]))


def test_sign_refuses_a_tampered_bundle(bundle_dir, tmp_path):
    key = tmp_path / "k.key"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (bundle_dir / "MODEL_CARD.md").write_text("# Edited\n")
    with pytest.raises(BundleError, match=r"sha256 of MODEL_CARD\.md does not match"):
        sign_bundle(bundle_dir, key)
    assert not (bundle_dir / SIGNATURES).exists()
