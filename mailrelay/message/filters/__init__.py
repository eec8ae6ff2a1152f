"""Filters run after DATA, before queueing: chasquid's hooks and rspamd (see verdict.py)."""

from .chain import Filters, Outcome
from .hooks import AliasTarget, Hooks, run_alias_resolve, run_post_data
from .rspamd import RspamdClient
from .verdict import FilterInput, Verdict, apply_verdict

__all__ = ["AliasTarget", "FilterInput", "Filters", "Hooks", "Outcome", "RspamdClient", "Verdict",
           "apply_verdict", "run_alias_resolve", "run_post_data"]
