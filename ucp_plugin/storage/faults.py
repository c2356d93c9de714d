"""Fault injection for crash-safety tests: ``UCP_FAULT=<point>:<rank>`` kills that rank with SIGKILL
when it reaches ``<point>`` (``before_shard``, ``after_shard``, ``before_manifest``,
``after_manifest``, ``before_latest``). Unset in normal runs, where ``point`` costs one dict lookup."""
import os
import signal

POINTS = ("before_shard", "after_shard", "before_manifest", "after_manifest", "before_latest")


def point(name: str, rank: int) -> None:
    spec = os.environ.get("UCP_FAULT")
    if not spec:
        return
    where, _, who = spec.partition(":")
    if where == name and (who == "" or int(who) == rank):
        os.kill(os.getpid(), signal.SIGKILL)
