"""Passwords out of URLs before anything is printed or logged.

    postgresql://optuna:s3cret@db.internal/optuna  ->  postgresql://optuna:***@db.internal/optuna

Credentials are better kept out of URLs altogether: PostgreSQL reads ``PGPASSWORD`` and
``~/.pgpass``, an MLflow server takes ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

# The password runs to the last "@" of the line: drivers accept "/", "@" and spaces in it
# unescaped. Where a line holds another "@" later, more than the password is masked; never less.
_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^\n]*)@")
_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pwd)=)[^&\s'\"]*", re.IGNORECASE)
# A URL in quotes, as ``{uri!r}`` writes it (escapes included), its closing quote followed by
# the end of a word: its password, if any, ends at the last "@" inside the quotes, unless the
# line holds that quote again after a later "@". Without this, 'http://127.0.0.1:9/m' ...
# NAME@ALIAS read as user 127.0.0.1 and a password running up to "@ALIAS".
_QUOTED_URL = re.compile(
    r"""(?P<q>['"])[a-zA-Z][a-zA-Z0-9+.-]*://(?:\\.|(?!(?P=q))[^\\\n])*(?P=q)"""
    r"""(?=$|[\s,;)\]}]|[.:](?:\s|$))""")


def mask(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it, and of every
    ``?password=`` query parameter, shown as ``***``."""
    pieces, last, at = [], 0, 0
    while quoted := _QUOTED_URL.search(text, at):
        at = quoted.start() + 1
        line_after = text[quoted.end():].partition("\n")[0]
        if "@" in line_after and quoted["q"] in line_after.partition("@")[2]:
            continue  # perhaps a quote in the password ('u:pa' ss@h'): mask to the last "@"
        pieces += [_mask(text[last:quoted.start()]), _mask(quoted.group())]
        last = at = quoted.end()
    return "".join([*pieces, _mask(text[last:])])


def _mask(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY.sub(lambda m: f"{m['key']}***", text)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) with every piece of ``url``'s password cut
    out: a driver that splits the URL at another "@" than ours quotes the rest as a host."""
    found = _USERINFO.search(url)
    if found and found["password"]:
        pieces = {found["password"], *re.split(r"[@/:\s]+", found["password"])}
        for piece in sorted(pieces, key=len, reverse=True):
            if len(piece) >= 2:
                text = text.replace(piece, "***")
        # No "@" left beside a cut piece, or masking the whole line would run on to it.
        text = re.sub(r"(?:\*\*\*@)+", "***", text)
    return mask(text)


def without_password(url: str) -> str:
    """``url`` with its password, in the user part or the query, removed; the user kept."""
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}@", url)
    url = re.sub(r"(?i)([?&])(?:password|passwd|pwd)=[^&\s]*&?", r"\1", url)
    return url.rstrip("?&")


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its user and password, and the two (``None`` where absent)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    password = None if parts.password is None else unquote(parts.password)
    return urlunsplit(parts._replace(netloc=host)), unquote(parts.username or ""), password
