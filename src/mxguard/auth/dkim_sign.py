"""DKIM signing (RFC 6376 §5, RFC 8463), one or several keys per message.

:func:`sign` / :class:`Signer` return DKIM-Signature header *values*, one per
key, folded with CRLF + TAB at most 78 columns wide. The signature covers
``"DKIM-Signature: " + value`` -- one space after the colon -- so an MTA that
writes the field that way (Postfix does for milter-added headers) keeps it
valid even under ``simple`` header canonicalization. With the default
``relaxed`` header canonicalization whitespace and folding do not matter; a
milter may turn the CRLFs into LFs.

Tags come in a fixed order: ``v a c d s [i] t [x] h bh b``. Keys share one
body hash per canonicalization (dual signing hashes the body once).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mxguard import config
from mxguard.auth.dkim_canon import (
    RELAXED,
    BodyHasher,
    BodyInput,
    HeaderInput,
    header_data,
    iter_body,
    normalize_headers,
    split_canonicalization,
    to_bytes,
)
from mxguard.auth.dkim_keys import SigningKey

SIG_FIELD = "DKIM-Signature"
DEFAULT_SIGN_HEADERS = tuple(config.DEFAULT_SIGN_HEADERS)  # RFC 6376 §5.4.1
LINE_WIDTH = 78
B64_CHUNK = LINE_WIDTH - 8
_FOLD = "\r\n\t"


def signed_header_list(headers: Sequence[tuple[bytes, bytes]], sign_headers: Sequence[str],
                       oversign: Sequence[str]) -> list[str]:
    """``h=``: each listed field once per occurrence, oversigned ones once more.

    From is always included (RFC 6376 §5.4) and oversigned when listed in
    ``oversign``; names that are not valid field names are dropped.
    """
    present: dict[str, int] = {}
    for name, _ in headers:
        key = name.rstrip(b" \t").decode("ascii", "replace").lower()
        present[key] = present.get(key, 0) + 1
    wanted = list(dict.fromkeys(n.strip() for n in sign_headers if _valid_name(n.strip())))
    if "from" not in (n.lower() for n in wanted):
        wanted.insert(0, "From")
    extra = {n.strip().lower() for n in oversign}
    out: list[str] = []
    for field_name in wanted:
        lower = field_name.lower()
        count = present.get(lower, 0) + (1 if lower in extra else 0)
        out.extend([field_name] * max(count, 1 if lower == "from" else 0))
    return out


def _valid_name(name: str) -> bool:
    return bool(name) and name.isascii() and all(33 <= ord(c) <= 126 and c != ":" for c in name)


def _fold(atoms: list[tuple[str, str]], column: int) -> str:
    """Join ``(separator, atom)`` pairs, breaking lines before an atom that would
    pass :data:`LINE_WIDTH` (a break replaces the separator)."""
    out: list[str] = []
    for sep, atom in atoms:
        if out and column + len(sep) + len(atom) > LINE_WIDTH:
            out.append(_FOLD)
            column = 8
            sep = ""
        out.append(sep + atom)
        column += len(sep) + len(atom)
    return "".join(out)


def _tag_atoms(tags: list[tuple[str, str]]) -> list[tuple[str, str]]:
    atoms: list[tuple[str, str]] = []
    for name, value in tags:
        if name == "h":  # FWS is allowed around the colons of h=
            names = value.split(":")
            pieces = [f"{n}:" for n in names[:-1]] + [f"{names[-1]};"]
            atoms.append((" ", "h=" + pieces[0]))
            atoms.extend(("", p) for p in pieces[1:])
        else:
            atoms.append((" ", f"{name}={value};"))
    return atoms


def _b_value(signature: bytes) -> str:
    """The folded ``b=`` value; it follows ``"\tb="`` at the start of a line."""
    text = base64.b64encode(signature).decode("ascii")
    first = LINE_WIDTH - 8 - 2
    rest = (_FOLD + text[i:i + B64_CHUNK] for i in range(first, len(text), B64_CHUNK))
    return text[:first] + "".join(rest)


@dataclass(frozen=True)
class SignOptions:
    sign_headers: Sequence[str] = DEFAULT_SIGN_HEADERS
    oversign: Sequence[str] = ("From",)
    canonicalization: str = "relaxed/relaxed"
    ttl: int = 0              # x= seconds after t= (0: no x=)
    identity: str = ""        # i= (empty: not given)


class Signer:
    """Sign one message with one or more keys, the body fed in chunks."""

    def __init__(self, headers: HeaderInput, keys: Sequence[SigningKey],
                 options: SignOptions | None = None, *, now: float | None = None) -> None:
        self.headers = normalize_headers(headers)
        self.keys = list(keys)
        self.options = options or SignOptions()
        self.header_canon, self.body_canon = split_canonicalization(
            self.options.canonicalization)
        self.now = int(time.time() if now is None else now)
        self.hasher = BodyHasher(self.body_canon)

    def feed(self, chunk: bytes) -> None:
        self.hasher.update(chunk)

    def finish(self) -> list[str]:
        """One DKIM-Signature value per key, in key order."""
        body_hash = base64.b64encode(self.hasher.digest()).decode("ascii")
        names = signed_header_list(self.headers, self.options.sign_headers,
                                   self.options.oversign)
        return [self._sign_one(key, names, body_hash) for key in self.keys]

    def _tags(self, key: SigningKey, names: list[str], body_hash: str) -> list[tuple[str, str]]:
        tags = [("v", "1"), ("a", key.algorithm),
                ("c", f"{self.header_canon}/{self.body_canon}"),
                ("d", key.domain), ("s", key.selector)]
        if self.options.identity:
            tags.append(("i", self.options.identity))
        tags.append(("t", str(self.now)))
        if self.options.ttl > 0:
            tags.append(("x", str(self.now + self.options.ttl)))
        return [*tags, ("h", ":".join(names)), ("bh", body_hash)]

    def _sign_one(self, key: SigningKey, names: list[str], body_hash: str) -> str:
        atoms = _tag_atoms(self._tags(key, names, body_hash))
        atoms[0] = ("", atoms[0][1])
        unsigned = _fold(atoms, len(SIG_FIELD) + 2) + _FOLD + "b="
        data = header_data(self.headers, names, self.header_canon, SIG_FIELD.encode(),
                           to_bytes(" " + unsigned))
        signature = key.sign(data, hashlib.sha256(data).digest())
        return unsigned + _b_value(signature)


def sign(headers: HeaderInput, body: BodyInput, keys: Sequence[SigningKey], *,
         sign_headers: Sequence[str] = DEFAULT_SIGN_HEADERS,
         oversign: Sequence[str] = ("From",), canonicalization: str = RELAXED + "/" + RELAXED,
         ttl: int = 0, identity: str = "", now: float | None = None) -> list[str]:
    """DKIM-Signature values for a message, one per key (see module doc)."""
    options = SignOptions(tuple(sign_headers), tuple(oversign), canonicalization, ttl, identity)
    signer = Signer(headers, keys, options, now=now)
    for chunk in iter_body(body):
        signer.feed(chunk)
    return signer.finish()
