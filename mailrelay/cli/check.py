"""``mailrelay check``: validate the configuration directory without starting anything."""

from __future__ import annotations

import argparse
import sys

from ..config import load_config
from ..message.dkim.keys import KeyRing
from ..policy.aliases import Aliases
from ..policy.users import UserDB
from ..smtp.tls import find_certificates


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("check", parents=[common],
                                   help="validate the configuration and print a summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"config {config.config_dir}: ok (hostname {config.hostname})")
    for warning in config.warnings:
        print(f"warning: {warning}")
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
    aliases, alias_errors = Aliases.load(config)
    keyring, key_errors = KeyRing.load(config)
    for domain in config.domains:
        users = UserDB.load(config.domain_dir(domain) / "users", domain)
        catch_all = " + catch-all" if aliases.catch_all(domain) else ""
        keys = keyring.keys_for(domain)
        dkim_note = (f"{len(keys)} DKIM key(s) ({', '.join(k.selector for k in keys)})"
                     if keys else "no DKIM keys")
        print(f"domain {domain}: {len(users.names())} user(s), "
              f"{aliases.count(domain)} alias(es){catch_all}, {dkim_note}")
    errors = [*alias_errors, *key_errors]
    for error in errors:
        print(f"mailrelay: {error}", file=sys.stderr)
    return 1 if errors else 0
