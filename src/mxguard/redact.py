"""Credentials out of everything mxguard prints: log lines, ``config show``,
error messages, ``storage migrate`` progress.

:func:`redact` replaces the password of every ``scheme://user:password@host``
in a text by ``***`` (the user, host, port and path stay, so the message
still says where), and the value of ``password=`` / ``sentinel_password=``
style query options. It is the one helper: the log formatter, the decision
log, the CLI's error line and the config dump all call it.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://[user]:password@  (the password ends at "@"; "/" and blanks end a netloc)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*):[^@/\s]*@")
# ?password=... &sentinel_password=... ;ssl_password=...
_QUERY = re.compile(r"(?P<head>[?&;][a-zA-Z_]*password=)[^&;\s'\"]*", re.IGNORECASE)


_KNOWN: set[str] = set()  # passwords of this process's own URLs (see remember)


def remember(text: str) -> None:
    """Note the passwords in ``text`` (the configured storage URL) so that
    :func:`redact_known` masks them wherever they appear."""
    for m in _USERINFO.finditer(text):
        secret = m.group(0)[len(m.group("head")) + 1:-1]
        if secret:
            _KNOWN.add(secret)
    for m in _QUERY.finditer(text):
        secret = m.group(0)[len(m.group("head")):]
        if secret:
            _KNOWN.add(secret)


def redact_known(text: str) -> str:
    """``text`` with the remembered passwords masked: one substring test per
    secret, cheap enough for every decision line (the hot path). Decision lines
    carry only request data, never a URL of ours; this guards them all the same."""
    for secret in _KNOWN:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(text: str) -> str:
    """``text`` with every URL password replaced by ``***``."""
    if "://" not in text and "assword=" not in text:  # the common case: nothing to do
        return text
    text = _USERINFO.sub(rf"\g<head>:{MASK}@", text)
    return _QUERY.sub(rf"\g<head>{MASK}", text)


__all__ = ["MASK", "redact", "redact_known", "remember"]
