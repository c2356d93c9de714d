"""Apply (or revert) ucp_plugin's Megatron-LM patches to a source tree, idempotently.

    python patches/apply_megatron_lm.py MEGATRON_LM_ROOT [--check] [--revert] [--any-version]

MEGATRON_LM_ROOT holds ``megatron/training/checkpointing.py`` and ``megatron/core/package_info.py``
(a Megatron-LM checkout, or an unpacked/installed megatron-core wheel that ships
``megatron/training``). Each ``*.patch`` beside this file is a unified diff of one upstream
function (see README.md); this tool needs only the standard library (no ``patch``/``git``).

A patch whose every hunk is already in the file is skipped (applying twice is a no-op); a file that
matches neither before nor after a hunk (another version, or local edits) is refused with the file,
the hunk and the supported versions, and nothing is written. ``--check`` reports without writing;
exit status 0 = applied or applies cleanly, 1 = refused.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PATCHES = ("megatron_lm_checkpointing.save_checkpoint.patch",
           "megatron_lm_checkpointing.load_checkpoint.patch")
SUPPORTED = ((0, 19, 0), (0, 19, 2))  # inclusive range of megatron/core/package_info.py versions
SUPPORTED_TEXT = "Megatron-LM / megatron-core 0.19.0 to 0.19.2"
PACKAGE_INFO = "megatron/core/package_info.py"


class PatchError(Exception):
    """A patch cannot be applied or reverted; the message names the file and what to do."""


@dataclass(frozen=True)
class Hunk:
    header: str
    old: str  # the lines the hunk expects (context and removed), joined
    new: str  # the lines it leaves (context and added), joined


@dataclass(frozen=True)
class FilePatch:
    name: str
    target: str  # path relative to the root, from the '+++ b/...' line
    hunks: tuple[Hunk, ...]

    def reversed(self) -> "FilePatch":
        return FilePatch(self.name, self.target, tuple(Hunk(h.header, h.new, h.old) for h in self.hunks))


def parse_patch(text: str, name: str) -> FilePatch:
    """One file's unified diff (text before the first ``---`` line is a comment)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("+++ ")]
    if len(starts) != 1 or not lines[starts[0] - 1].startswith("--- "):
        raise PatchError(f"{name}: expected a unified diff of exactly one file ('--- a/X', '+++ b/X')")
    target = lines[starts[0]][4:].strip().split("\t")[0]
    target = target[2:] if target.startswith("b/") else target
    hunks, body = [], lines[starts[0] + 1:]
    while body:
        if not body[0].startswith("@@"):
            raise PatchError(f"{name}: unexpected line {body[0]!r} outside a hunk")
        hunk, body = _read_hunk(body, name)
        hunks.append(hunk)
    if not hunks:
        raise PatchError(f"{name}: no hunks")
    return FilePatch(name, target, tuple(hunks))


def _read_hunk(lines: list[str], name: str) -> tuple[Hunk, list[str]]:
    header = lines[0].rstrip("\n")
    m = re.match(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", header)
    if not m:
        raise PatchError(f"{name}: malformed hunk header {header!r}")
    n_old, n_new = int(m.group(1) or 1), int(m.group(2) or 1)
    old, new, i = [], [], 1
    while len(old) < n_old or len(new) < n_new:
        if i >= len(lines):
            raise PatchError(f"{name}: hunk {header!r} is truncated")
        tag, rest = lines[i][:1], lines[i][1:]
        if tag in (" ", "\n"):
            rest = rest or "\n"
            old.append(rest)
            new.append(rest)
        elif tag == "-":
            old.append(rest)
        elif tag == "+":
            new.append(rest)
        elif tag != "\\":
            raise PatchError(f"{name}: unexpected line {lines[i]!r} in hunk {header!r}")
        i += 1
    return Hunk(header, "".join(old), "".join(new)), lines[i:]


def hunk_state(text: str, hunk: Hunk) -> str:
    """'applied' (the result is there once), 'clean' (the expected text is there once) or
    'conflict'."""
    if text.count(hunk.new) == 1:
        return "applied"
    if text.count(hunk.old) == 1:
        return "clean"
    return "conflict"


def apply_to_text(text: str, patch: FilePatch, where: str) -> tuple[str, bool]:
    """The patched text and whether it changed; refuses a file that is neither before nor after."""
    states = [hunk_state(text, h) for h in patch.hunks]
    if all(s == "applied" for s in states):
        return text, False
    bad = [h.header for h, s in zip(patch.hunks, states) if s != "clean"]
    if bad:
        raise PatchError(f"{where}: {patch.name} does not apply (hunk {bad[0]} matches neither the "
                         f"upstream nor the patched text): the file is another version or was edited "
                         f"locally. Supported: {SUPPORTED_TEXT}; restore the original file, or use "
                         "a supported version")
    for hunk in patch.hunks:
        text = text.replace(hunk.old, hunk.new, 1)
    return text, True


def read_version(root: str) -> tuple[int, int, int]:
    """MAJOR.MINOR.PATCH from ``megatron/core/package_info.py`` (read, not executed)."""
    path = os.path.join(root, PACKAGE_INFO)
    try:
        with open(path) as f:
            source = f.read()
    except FileNotFoundError:
        raise PatchError(f"{path}: not found, so the Megatron-LM version is unknown; pass the root "
                         "folder that holds megatron/core and megatron/training") from None
    parts = [re.search(rf"^{k} = (\d+)", source, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise PatchError(f"{path}: no MAJOR/MINOR/PATCH numbers; cannot tell the Megatron-LM version")
    return tuple(int(p.group(1)) for p in parts)


def check_version(root: str) -> tuple[int, int, int]:
    version = read_version(root)
    if not SUPPORTED[0] <= version <= SUPPORTED[1]:
        found = ".".join(map(str, version))
        raise PatchError(f"{os.path.join(root, PACKAGE_INFO)}: version {found} is outside the "
                         f"supported range ({SUPPORTED_TEXT}); use a supported version, or pass "
                         "--any-version to try anyway (the patch must still match exactly)")
    return version


def load_patches(names=PATCHES, revert: bool = False) -> list[FilePatch]:
    patches = []
    for name in names:
        with open(os.path.join(HERE, name)) as f:
            patch = parse_patch(f.read(), name)
        patches.append(patch.reversed() if revert else patch)
    return patches


def run(root: str, check: bool = False, revert: bool = False, any_version: bool = False) -> list[str]:
    """Apply (or revert) every patch under ``root``; returns one status line per patch. Nothing is
    written unless every patch of a file applies and the result compiles."""
    if not any_version:
        check_version(root)
    results, texts = [], {}
    for patch in load_patches(revert=revert):
        where = os.path.join(root, patch.target)
        if where not in texts:
            texts[where] = _read_target(where)
        texts[where], changed = apply_to_text(texts[where], patch, where)
        verb = "reverted" if revert else "applied"
        state = (f"would be {verb}" if check else verb) if changed else (
            "not applied, nothing to revert" if revert else "already applied")
        results.append(f"{where}: {patch.name}: {state}")
    for where, text in texts.items():
        _compile(text, where)
        if not check:
            _write_if_changed(where, text)
    return results


def _read_target(where: str) -> str:
    try:
        with open(where, newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise PatchError(f"{where}: not found; pass the Megatron-LM root folder (the one holding "
                         f"megatron/training/), supported: {SUPPORTED_TEXT}") from None


def _compile(text: str, where: str) -> None:
    try:
        compile(text, where, "exec")
    except SyntaxError as e:
        raise PatchError(f"{where}: the patched file would not compile ({e}); nothing was written, "
                         "please report this with your Megatron-LM version") from None


def _write_if_changed(where: str, text: str) -> None:
    with open(where, newline="") as f:
        if f.read() == text:
            return
    tmp = where + ".ucp-tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, where)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", metavar="MEGATRON_LM_ROOT")
    parser.add_argument("--check", action="store_true", help="report only, write nothing")
    parser.add_argument("--revert", action="store_true", help="undo the patches")
    parser.add_argument("--any-version", action="store_true",
                        help=f"skip the version check (supported: {SUPPORTED_TEXT})")
    args = parser.parse_args(argv)
    try:
        for line in run(args.root, args.check, args.revert, args.any_version):
            print(line)
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
