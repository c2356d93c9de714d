"""Fault injection for crash-safety tests: ``UCP_FAULT=<point>:<rank>`` kills that rank with SIGKILL
when it reaches ``<point>`` (``staging``, ``before_shard``, ``after_shard``, ``before_manifest``,
``after_manifest``, ``before_latest``); ``UCP_FAULT=<point>:<rank>:<errno name>`` (e.g. ``ENOSPC``)
raises that ``OSError`` there instead, as a full or read-only disk would. Unset in normal runs, where
``point`` costs one dict lookup."""
import errno
import os
import signal

POINTS = ("before_shard", "after_shard", "before_manifest", "after_manifest", "before_latest")


def point(name: str, rank: int) -> None:
    spec = os.environ.get("UCP_FAULT")
    if not spec:
        return
    where, who, error = (spec.split(":") + ["", ""])[:3]
    if where != name or (who != "" and int(who) != rank):
        return
    if error:
        code = getattr(errno, error)
        raise OSError(code, os.strerror(code))
    os.kill(os.getpid(), signal.SIGKILL)
