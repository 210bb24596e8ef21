"""Combined matchers of the rule engine: one Hyperscan pass per text.

The regex rules of each target (``body``, ``rawbody``, ``full``, ``uri`` and
each header spec such as ``Subject`` or ``From:addr``) are compiled into
Hyperscan databases of prefilter patterns (:mod:`mxguard.content.rules_hs`):
one scan of the text names the rules that may match, and only those run with
Python ``re`` (which decides; hits are exactly those of one regex per rule).
Rules Hyperscan cannot take keep the literal prefilter.

Compiling SpamAssassin's ~1,300 regexes takes Hyperscan tens of seconds, so
:class:`Compiler` does it in chunks of :data:`CHUNK` patterns, and the result
is kept on disk (:func:`write_cache` / :func:`read_cache`, under the state
directory, keyed by a hash of the rule files and of the engine) together with
each rule's translated Python pattern and literals: a later start-up reads it
back in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mxguard.content.rules_hs import padded

log = logging.getLogger("mxguard")

CHUNK = 64  # patterns per Hyperscan database (compile time grows faster than linearly)
ENGINE_VERSION = "6"  # bump when translation, literals or Hyperscan patterns change
_MAGIC = b"MXRULES1\n"
_HS_FLAGS_NAMES = ("HS_FLAG_PREFILTER", "HS_FLAG_SINGLEMATCH", "HS_FLAG_ALLOWEMPTY",
                   "HS_FLAG_MULTILINE")


def _hs() -> Any:
    import hyperscan

    return hyperscan


def hs_version() -> str:
    try:
        return str(_hs().__version__)
    except Exception:
        return "none"


class HsMatcher:
    """Hyperscan databases over the patterns of one target; ``matches(text)``
    gives the indices (into the target's rule list) that may match."""

    def __init__(self, dbs: list[Any]) -> None:
        self.dbs = dbs
        self._local = threading.local()  # scratch space serves one scan at a time

    def _scratches(self) -> list[Any]:
        scratches: list[Any] | None = getattr(self._local, "scratches", None)
        if scratches is None:
            hs = _hs()
            scratches = self._local.scratches = [hs.Scratch(db) for db in self.dbs]
        return scratches

    def matches(self, text: bytes) -> list[int]:
        found: list[int] = []
        text = padded(text)  # the patterns' anchors are newlines (rules_hs)
        for db, scratch in zip(self.dbs, self._scratches(), strict=True):
            db.scan(text, match_event_handler=_collect, context=found, scratch=scratch)
        return found


def _collect(pid: int, start: int, end: int, flags: int, context: Any) -> None:
    context.append(pid)


def _flags() -> int:
    hs = _hs()
    value = 0
    for name in _HS_FLAGS_NAMES:
        value |= getattr(hs, name)
    return value


def compile_chunk(patterns: Sequence[tuple[int, bytes]]) -> tuple[list[Any], list[int]]:
    """Databases for (id, pattern) pairs; ids Hyperscan refuses come back
    separately (a refused chunk is split until the culprit stands alone)."""
    if not patterns:
        return [], []
    hs = _hs()
    flags = _flags()
    db = hs.Database(mode=hs.HS_MODE_BLOCK)
    try:
        db.compile(expressions=[p for _, p in patterns], ids=[i for i, _ in patterns],
                   elements=len(patterns), flags=[flags] * len(patterns))
    except Exception:
        if len(patterns) == 1:
            return [], [patterns[0][0]]
        half = len(patterns) // 2
        dbs1, bad1 = compile_chunk(patterns[:half])
        dbs2, bad2 = compile_chunk(patterns[half:])
        return dbs1 + dbs2, bad1 + bad2
    return [db], []


def compile_target(patterns: Sequence[tuple[int, bytes]]) -> tuple[list[Any], list[int]]:
    dbs: list[Any] = []
    bad: list[int] = []
    for start in range(0, len(patterns), CHUNK):
        d, b = compile_chunk(patterns[start:start + CHUNK])
        dbs += d
        bad += b
    return dbs, bad


# ------------------------------------------------------------------ the disk cache


def cache_key(files: Sequence[str], extra: str) -> str | None:
    """Hash of the rule files' bytes (in load order), the engine and ``extra``;
    None when a file cannot be read (then nothing is cached)."""
    h = hashlib.sha256()
    h.update(f"{ENGINE_VERSION}|{sys.version_info[:2]}|{hs_version()}|{extra}".encode())
    for name in files:
        try:
            data = Path(name).read_bytes()
        except OSError:
            return None
        h.update(name.encode("utf-8", "replace") + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(cache_dir) / f"rules-{key[:32]}.bin"


def write_cache(path: Path, meta: dict[str, Any], blobs: list[bytes]) -> None:
    """Write ``meta`` (JSON) and the database blobs: a new file, never through a
    symlink (O_EXCL | O_NOFOLLOW on a temporary name), renamed into place; older
    cache files of the directory are removed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    header = json.dumps({**meta, "blobs": [len(b) for b in blobs]}).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(OSError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_MAGIC + struct.pack(">Q", len(header)) + header)
            for blob in blobs:
                fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    for old in path.parent.glob("rules-*.bin"):
        if old.name != path.name:
            with contextlib.suppress(OSError):
                old.unlink()


def read_cache(path: Path) -> tuple[dict[str, Any], list[bytes]] | None:
    """(meta, blobs), or None for a missing, foreign or damaged file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        if not data.startswith(_MAGIC):
            return None
        pos = len(_MAGIC)
        (size,) = struct.unpack(">Q", data[pos:pos + 8])
        pos += 8
        meta = json.loads(data[pos:pos + size])
        pos += size
        blobs = []
        for n in meta.pop("blobs"):
            blobs.append(data[pos:pos + n])
            pos += n
        if pos != len(data) or not isinstance(meta, dict):
            return None
        return meta, blobs
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def looks_cached(path: Path) -> bool:
    """A cache file is there (not a symlink) and starts as one; cheaper than
    :func:`read_cache`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as fh:
        return fh.read(len(_MAGIC)) == _MAGIC


def dump_db(db: Any) -> bytes:
    return bytes(_hs().dumpb(db))


def load_db(blob: bytes) -> Any:
    hs = _hs()
    return hs.loadb(blob, hs.HS_MODE_BLOCK)


__all__ = ["CHUNK", "ENGINE_VERSION", "HsMatcher", "cache_key", "cache_path", "compile_target",
           "dump_db", "load_db", "looks_cached", "read_cache", "write_cache"]
