"""``mailrelay dns records|check``: the DNS records a domain needs, and whether DNS has them."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap

from ..config import Config, load_config, parse_duration
from ..message.dkim.keys import load_domain_keys
from ..message.dkim.signer import DKIMKey
from ..ops.dnsrecords import (
    ERROR,
    OK,
    CheckResult,
    IPAddress,
    RecordPlan,
    describe_resolver,
    hostname_addresses,
    iter_check_records,
    lookup_timeout,
    make_lookup,
    parse_ips,
    plan_records,
    probe_resolvers,
)
from ..policy.authres import DNSTempError
from .common import local_domain

_WIDTH = 88


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:

    actions = parser.add_subparsers(dest="dns_command", metavar="ACTION", required=True)

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("domain", metavar="DOMAIN", help="a local domain")
    options.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                         help="a public IPv4 or IPv6 address of this server (repeat for each; "
                              "default: the A/AAAA records of the hostname)")
    options.add_argument("--strict-spf", action="store_true",
                         help="end the SPF record in -all instead of ~all")
    options.add_argument("--relay-spf", metavar="TERM",
                         help="the SPF term of delivery.relay's provider, e.g. "
                              "include:amazonses.com (default: from mailrelay's table of "
                              "common relay services)")
    options.add_argument("--json", action="store_true", help="print JSON")
    options.add_argument("--timeout", type=_duration, metavar="DURATION",
                         help="per lookup (default: dns.timeout, at most 3s)")

    records = actions.add_parser("records", parents=[common, options],
                                 help="print the records to publish, as zone-file lines")
    records.set_defaults(func=cmd_records)
    check = actions.add_parser("check", parents=[common, options],
                               help="look the records up and say which are missing or wrong")
    check.set_defaults(func=cmd_check)


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a timeout must be longer than 0s")
    return seconds


def _keys(config: Config, domain: str) -> tuple[list[DKIMKey], int]:
    """The domain's DKIM keys; a broken key file is reported on stderr and counted."""
    keys, errors = load_domain_keys(config.domain_dir(domain), domain)
    for error in errors:
        print(f"mailrelay: {error}", file=sys.stderr)
    return keys, len(errors)


def cmd_records(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domain = local_domain(config, args.domain)
    return print_records(config, domain, args.ip, strict_spf=args.strict_spf,
                         relay_spf=args.relay_spf, as_json=args.json, timeout=args.timeout)


def print_records(config: Config, domain: str, ip_args: list[str], *,
                  strict_spf: bool = False, relay_spf: str | None = None,
                  as_json: bool = False, timeout: float | None = None) -> int:
    """What ``dns records`` prints (also ``mailrelay init``); 1 if a key file is broken."""
    ips: list[IPAddress] = parse_ips(ip_args)
    source = "--ip"
    if not ips:
        source = "dns"
        try:
            ips = hostname_addresses(make_lookup(config, timeout), config.hostname)
        except DNSTempError as exc:
            trouble = probe_resolvers(config, timeout) or str(exc)
            print(f"mailrelay: cannot look up the addresses of {config.hostname} "
                  f"through {describe_resolver(config)}: {trouble}", file=sys.stderr)
        if not ips:
            source = "none"
    keys, broken = _keys(config, domain)
    plan = plan_records(config, domain, keys, ips, source, strict_spf=strict_spf,
                        relay_spf=relay_spf)
    if as_json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(format_plan(plan))
    return 1 if broken else 0


def _comment(text: str) -> list[str]:
    # A `command` stays on one line, so it can be copied.
    text = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(text, _WIDTH, initial_indent="; ", subsequent_indent="; ",
                          break_on_hyphens=False, break_long_words=False)
    return [line.replace("\0", " ") for line in lines]


def format_plan(plan: RecordPlan) -> str:
    where = " from its A/AAAA records" if plan.ip_source == "dns" else ""
    addresses = f" ({', '.join(plan.ips)}{where})" if plan.ips else ""
    lines = _comment(f"DNS records for {plan.domain}, whose mail server is "
                     f"{plan.hostname}{addresses}. Paste them into the zone of the domain "
                     "(the PTR records go to your VPS provider instead), then run "
                     f"`mailrelay dns check {plan.domain}`.")
    optional_started = False
    previous_why = None
    for record in plan.records:
        if not record.required and not optional_started:
            lines += ["", *_comment("Recommended and optional records:")]
            optional_started = True
        if record.why != previous_why:  # one explanation for a run of alike records
            lines += ["", *_comment(f"{record.kind}: {record.why}")]
            previous_why = record.why
        # A stand-in value is commented out so a pasted zone still loads.
        lines.append(f"; {record.zone()}" if record.placeholder else record.zone())
    lines += ["", *_comment(f"The MTA-STS policy, to serve as https://mta-sts.{plan.domain}"
                            "/.well-known/mta-sts.txt (set mode: enforce once the TLS-RPT "
                            "reports are clean; the id above changes with it):")]
    lines += [f";   {line}" for line in plan.mta_sts_policy.splitlines()]
    if plan.notes:
        lines.append("")
        for note in plan.notes:
            lines += _comment(f"Note: {note}")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domain = local_domain(config, args.domain)
    ips = parse_ips(args.ip)
    keys, broken = _keys(config, domain)
    timeout = lookup_timeout(config, args.timeout)
    resolver = describe_resolver(config)
    if not args.json:
        print(f"{domain}: asking {resolver}, {timeout:g}s per lookup", flush=True)
    # A resolver that does not answer is said once, at once, rather than as a timeout
    # per record (ten records, ten timeouts).
    down = probe_resolvers(config, timeout)
    if down is not None and not args.json:
        print(f"error:  {down}", flush=True)
    results = []
    for result in iter_check_records(config, domain, keys, ips, strict_spf=args.strict_spf,
                                     relay_spf=args.relay_spf, timeout=timeout,
                                     resolver_down=down):
        results.append(result)
        if not args.json:
            print(format_result(result), flush=True)  # as soon as it is known
    bad = [r for r in results if not r.good]
    if args.json:
        print(json.dumps({
            "domain": domain, "hostname": config.hostname, "ok": not bad and not broken,
            "resolver": resolver, "resolver_error": down,
            "results": [vars(r) for r in results],
        }, indent=2))
    else:
        print(format_summary(domain, results, down))
    return 1 if bad or broken else 0


_KIND_WIDTH = len("SPF-HELO")  # the longest kind


def format_result(result: CheckResult) -> str:
    optional = "" if result.required else " (optional)"
    lines = [f"{result.status:<7} {result.kind:<{_KIND_WIDTH}} "
             f"{result.name}: {result.detail}{optional}"]
    if result.status != OK:
        for i, fix in enumerate(result.fix):
            lines.append(f"{'':8}{'fix:' if i == 0 else '    '} {fix}")
    return "\n".join(lines)


def format_summary(domain: str, results: list[CheckResult], down: str | None = None) -> str:
    lines = []
    to_fix = [r for r in results if not r.good and r.status != ERROR]
    unchecked = [r for r in results if not r.good and r.status == ERROR]
    if to_fix:
        lines.append(f"{domain}: {_count(to_fix)} to fix "
                     f"({', '.join(f'{r.kind} {r.status}' for r in to_fix)})")
    if unchecked:
        why = "the resolver does not answer" if down else "of DNS trouble"
        lines.append(f"{domain}: {_count(unchecked)} not checked because {why} "
                     f"({', '.join(r.kind for r in unchecked)}); try again")
    if not to_fix and not unchecked:
        lines.append(f"{domain}: all required records are right")
    return "\n".join(lines)


def _count(results: list[CheckResult]) -> str:
    return f"{len(results)} required record{'s' if len(results) > 1 else ''}"
