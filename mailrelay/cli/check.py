"""``mailrelay check``: validate the configuration directory without starting anything."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..aliases import Aliases
from ..config import Config, load_config
from ..delivery.relay import RelayFailure, relay_from_config
from ..delivery.remote import verifying_tls_context
from ..dkim.keys import KeyRing
from ..dnsresolver import make_resolver
from ..tls import find_certificates
from ..users import UserDB


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
    if config.delivery.relay is not None:
        print(relay_status(config))
    errors = [*alias_errors, *key_errors]
    for error in errors:
        print(f"mailrelay: {error}", file=sys.stderr)
    return 1 if errors else 0


# `check` should answer soon even when the relay does not.
_PROBE_TIMEOUT = 10.0


def relay_status(config: Config) -> str:
    """One line on delivery.relay: reachable, TLS verified and login accepted, or a
    warning saying which of those failed. A warning only: the network or the relay may
    be down for a while, which the queue rides out; the password is never shown."""
    settings = config.delivery.relay
    assert settings is not None
    where = f"relay {settings.host}:{settings.port} ({settings.tls})"
    scope = ", ".join(settings.domains) if settings.domains else "all remote mail"
    try:
        detail = asyncio.run(_probe(config))
    except RelayFailure as failure:
        return f"warning: {where} for {scope}: {failure.reply}"
    return f"{where} for {scope}: ok ({detail})"


async def _probe(config: Config) -> str:
    relay = relay_from_config(config, verifying_tls_context(config.delivery.ca_file))
    assert relay is not None
    relay.connect_timeout = min(relay.connect_timeout, _PROBE_TIMEOUT)
    relay.command_timeout = min(relay.command_timeout, _PROBE_TIMEOUT)
    last = RelayFailure(f"451 4.4.1 relay {relay.host}: no address")
    for address in await relay.addresses(make_resolver(config.dns)):
        try:
            smtp = await relay.open(address)
        except RelayFailure as failure:
            last = failure
            continue
        ssl_object = smtp.get_transport_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "?"
        try:
            await smtp.quit(timeout=_PROBE_TIMEOUT)
        except Exception:  # the answer is in; how the relay says goodbye does not matter
            smtp.close()
        login = (f", logged in as {relay.settings.username}"
                 if relay.settings.username is not None else "")
        return f"[{address}], TLS verified ({version}){login}"
    raise last
