"""``vramancer keys``: this node's Secure Fabric identity and the fingerprints it trusts.

    vramancer keys init [--force] [--name NAME]  make the Ed25519 key + self-signed certificate
    vramancer keys show [--json]                 this node's fingerprint (give it to your peers)
    vramancer keys trust FINGERPRINT             accept Link connections from that key
    vramancer keys revoke FINGERPRINT            refuse that key from now on (revoked wins)
    vramancer keys list [--json]                 trusted and revoked fingerprints

Files live in ``--dir`` (default: the ``keys`` folder next to the config file, see keys.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .keys import TrustStore, create_identity, keys_dir, load_identity

__all__ = ["configure", "main"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None, help="identity folder (default: keys/ next to the config file)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="make this node's key pair and certificate")
    init.add_argument("--force", action="store_true", help="replace an existing identity")
    init.add_argument("--name", default="vramancer-node", help="certificate common name")
    show = sub.add_parser("show", help="print this node's fingerprint")
    show.add_argument("--json", action="store_true", help="print JSON")
    trust = sub.add_parser("trust", help="trust a peer's fingerprint")
    trust.add_argument("fingerprint")
    revoke = sub.add_parser("revoke", help="revoke a peer's fingerprint")
    revoke.add_argument("fingerprint")
    lst = sub.add_parser("list", help="list trusted and revoked fingerprints")
    lst.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    directory = args.dir if args.dir is not None else keys_dir()
    if args.action == "init":
        ident = create_identity(directory, name=args.name, force=args.force)
        print(f"identity written to {directory}")
        print(f"fingerprint {ident.fingerprint}")
        return 0
    if args.action == "show":
        ident = load_identity(directory)
        if args.json:
            print(json.dumps({"schema": 1, "fingerprint": ident.fingerprint, "certificate": str(ident.cert_path),
                              "key": str(ident.key_path)}, indent=2))
        else:
            print(ident.fingerprint)
        return 0
    store = TrustStore.load(directory / "trust.json")
    if args.action in ("trust", "revoke"):
        fp = store.trust(args.fingerprint) if args.action == "trust" else store.revoke(args.fingerprint)
        store.save()
        print(f"{'trusted' if args.action == 'trust' else 'revoked'} {fp}")
        return 0
    if args.json:
        print(json.dumps({"schema": 1, "trusted": store.trusted, "revoked": store.revoked}, indent=2))
    else:
        for fp in store.trusted:
            print(f"trusted  {fp}")
        for fp in store.revoked:
            print(f"revoked  {fp}")
        if not store.trusted and not store.revoked:
            print(f"no fingerprints in {store.path}")
    return 0
