"""``mailrelay check``: validate the configuration directory without starting anything."""

from __future__ import annotations

import argparse

from ..config import load_config
from ..tls import find_certificates
from ..users import UserDB


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("check", parents=[common],
                                   help="validate the configuration and print a summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"config {config.config_dir}: ok (hostname {config.hostname})")
    certificates = find_certificates(config.tls)
    if certificates:
        for cert in certificates:
            print(f"certificate {cert.name}: {', '.join(cert.names)} "
                  f"(valid until {cert.not_after:%Y-%m-%d})")
    elif config.tls.self_signed:
        print("certificates: none found; a self-signed one is generated at start")
    else:
        print("certificates: none found (TLS, AUTH and port 465 need one)")
    if not config.domains:
        print(f"no domains: create {config.domains_dir}/<domain>/")
    for domain in config.domains:
        directory = config.domain_dir(domain)
        users = UserDB.load(directory / "users", domain)
        aliases = directory / "aliases"
        alias_note = "aliases file" if aliases.exists() else "no aliases"
        dkim = sorted(p.name for p in directory.glob("dkim:*.pem"))
        dkim_note = f"{len(dkim)} DKIM key(s)" if dkim else "no DKIM keys"
        print(f"domain {domain}: {len(users.names())} user(s), {alias_note}, {dkim_note}")
    return 0
