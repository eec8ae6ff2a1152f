"""``mailrelay import-chasquid``: turn a chasquid configuration directory into ours."""

from __future__ import annotations

import argparse

from ..config import CONFIG_FILE
from ..migrate.chasquid import Plan, apply, plan_import


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Read chasquid's configuration directory (never changing it) and write an equivalent "
        "mailrelay configuration into the -c directory, which must not have a mailrelay.yaml yet. "
        "Prints one line per thing converted and one per thing that was not, with what to do "
        "instead.")
    parser.add_argument("chasquid_dir", metavar="CHASQUID_DIR",
                        help="chasquid's configuration directory, e.g. /etc/chasquid")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the new mailrelay.yaml; write nothing")
    parser.add_argument("--copy-certs", action="store_true",
                        help="copy the certificates instead of using chasquid's certs/ "
                             "in place")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = plan_import(args.chasquid_dir, args.config, copy_certs=args.copy_certs)
    _report(plan)
    if args.dry_run:
        for planned in plan.all_files():
            print(f"would write {plan.target_dir / planned.path} (mode {planned.mode:04o})")
        print(f"--- {plan.target_dir / CONFIG_FILE} would be:")
        print(plan.config_text, end="")
        print("--- dry run: nothing written")
        return 0
    written = apply(plan)
    print(f"wrote {len(written)} file(s) under {plan.target_dir}; chasquid's directory "
          "was not changed")
    print(f"next: mailrelay check -c {plan.target_dir}")
    return 0


def _report(plan: Plan) -> None:
    for line in plan.converted:
        print(f"converted: {line}")
    for line in plan.not_converted:
        print(f"not converted: {line}")
