"""Removing what interrupted saves leave in a save folder, without touching a save in progress.

A save writes into a hidden staging folder ``.<tag>.staging-<id>-<pid>@<host>`` (named by rank 0 of
the saving job) and renames it to ``<tag>`` at commit; a job killed before that leaves the staging
folder behind. A commit that replaces an existing ``<tag>`` moves the old one to
``<tag>.old-<id>`` first; a crash between the two renames leaves it behind too.

``sweep`` runs at commit, under the save folder's lock, and removes:
- staging folders whose owner ran on this host and is no longer alive (the common case: a job
  restarted on the same node after a crash);
- staging folders not modified for ``UCP_STALE_STAGING_HOURS`` (default 24) hours, whoever owns them:
  a live save writes its files within minutes, and another host's process cannot be checked;
- ``<tag>.old-*`` folders whose ``<tag>`` exists (the replacement completed) and that no reader on
  this host holds open (``folder.in_use``). When ``<tag>`` is missing the old folder is the only
  copy and is kept.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time

from .folder import in_use

log = logging.getLogger(__name__)
_STAGING = re.compile(r"^\.(?P<tag>.+)\.staging-[0-9a-f]+(?:-(?P<pid>\d+)@(?P<host>.+))?$")
_OLD = re.compile(r"^(?P<tag>.+)\.old-[0-9a-f]{8}$")


def owner_suffix() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _last_change(path: str) -> float:
    newest = os.path.getmtime(path)
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                newest = max(newest, os.path.getmtime(os.path.join(folder, name)))
            except FileNotFoundError:
                pass
    return newest


def _is_stale_staging(path: str, match: re.Match, max_age: float) -> bool:
    if match["pid"] and match["host"] == socket.gethostname() and not _alive(int(match["pid"])):
        return True
    return time.time() - _last_change(path) > max_age


def stale_folders(root: str, current: str | None = None, max_age: float | None = None) -> list[str]:
    """The folders in ``root`` that ``sweep`` would remove (``current``: this save's staging)."""
    if max_age is None:
        max_age = float(os.environ.get("UCP_STALE_STAGING_HOURS", "24")) * 3600
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or (current and os.path.abspath(path) == os.path.abspath(current)):
            continue
        staging, old = _STAGING.match(name), _OLD.match(name)
        if staging and _is_stale_staging(path, staging, max_age):
            out.append(path)
        elif old and os.path.isdir(os.path.join(root, old["tag"])) and not in_use(path):
            out.append(path)
    return out


def sweep(root: str, current: str | None = None) -> list[str]:
    """Remove the stale folders of ``root``; returns what was removed."""
    removed = []
    for path in stale_folders(root, current):
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by an interrupted save", path)
        removed.append(path)
    return removed
