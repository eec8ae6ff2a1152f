"""``mailrelay dkim``: create DKIM keys and print the DNS records that publish them."""

from __future__ import annotations

import argparse
import sys
import time

from ..config import load_config
from ..errors import MailrelayError
from ..message.dkim.keys import (
    ALGOS,
    dns_record,
    format_txt,
    generate_key,
    load_domain_keys,
    write_key,
)
from ..message.dkim.signer import DKIMKey
from .common import local_domain, unreadable_for_service


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:

    actions = parser.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)

    keygen = actions.add_parser("keygen", parents=[common],
                                help="create a signing key and print its DNS record")
    keygen.add_argument("domain", metavar="DOMAIN", help="a local domain")
    keygen.add_argument("--selector", metavar="S",
                        help="selector (default: today's date, YYYYMMDD)")
    keygen.add_argument("--algo", choices=ALGOS, default="rsa2048",
                        help="key type (default rsa2048; ed25519 is not yet verified by "
                             "every receiver, so use it beside an RSA key)")
    keygen.set_defaults(func=cmd_keygen)

    dns = actions.add_parser("dns", parents=[common],
                             help="print the DNS TXT records of a domain's keys")
    dns.add_argument("domain", metavar="DOMAIN", nargs="?",
                     help="a local domain (default: every domain with keys)")
    dns.set_defaults(func=cmd_dns)


def cmd_keygen(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domain = local_domain(config, args.domain)
    selector = args.selector or time.strftime("%Y%m%d")
    key = generate_key(args.algo)
    path = write_key(config.domain_dir(domain), selector, key)
    name, value = dns_record(DKIMKey.from_private_key(domain, selector, key, path))
    print(f"wrote {path} ({args.algo})")
    print(f"publish this TXT record in the DNS of {domain}:")
    print(format_txt(name, value))
    # As `user add` warns when the server did not take its file: a key the server's user
    # cannot read (root wrote it into a directory root made) never signs.
    who = unreadable_for_service(config.config_dir, path)
    if who is not None:
        service_uid = config.config_dir.stat().st_uid
        fix = (f"chown {who}: {path.parent} {path}" if path.stat().st_uid != service_uid
               else "a directory on the way is closed to it: `mailrelay check` names it")
        print(f"warning: {path} is written, but {who}, the server's user (the owner of "
              f"{config.config_dir}), cannot read it, so it does not sign: {fix}",
              file=sys.stderr)
        return 1
    return 0


def cmd_dns(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domains = [local_domain(config, args.domain)] if args.domain else list(config.domains)
    printed = failed = 0
    for domain in domains:
        keys, errors = load_domain_keys(config.domain_dir(domain), domain)
        for error in errors:
            print(f"mailrelay: {error}", file=sys.stderr)
        failed += len(errors)
        for key in keys:
            print(format_txt(*dns_record(key)))
            printed += 1
    if not printed and not failed:
        where = domains[0] if args.domain else "any domain"
        hint = domains[0] if args.domain else "DOMAIN"
        raise MailrelayError(f"no DKIM keys for {where} "
                             f"(create one with `mailrelay dkim keygen {hint}`)")
    return 1 if failed else 0
