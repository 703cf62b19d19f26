"""Secrets never leave the process: values under secret-looking keys are masked in every file and log we write."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_SECRET_WORDS = {"apikey", "secret", "password", "passwd", "pwd", "credential", "credentials"}
_SECRET_LAST_WORDS = {"key", "token"}
REDACTED = "***"
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def is_secret_key(key: str) -> bool:
    """True for names like ``api_key``, ``HF_TOKEN``, ``clientSecret``, ``db.password``.

    Whole words only, and ``key`` / ``token`` only as the last word, so ``tokenizer``, ``tokens_seen``,
    ``token_budget``, ``keep_last`` and ``num_key_value_heads`` are not secrets.
    """
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", str(key)) if w]
    return any(w in _SECRET_WORDS for w in words) or (bool(words) and words[-1] in _SECRET_LAST_WORDS)


def scrub(value: Any) -> Any:
    """``value`` with every mapping entry whose key looks secret removed, recursively."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def redact_values(value: Any) -> Any:
    """``value`` with every value under a secret-looking key replaced by ``***``, recursively (the key stays, so
    a reader sees that one was set)."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) else redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


def redact_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with secret values masked: ``api_key=x``, ``--hf-token x``, ``https://u:p@host``."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        arg = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", arg)
        name, eq, _ = arg.partition("=")
        if eq and is_secret_key(name.lstrip("-")):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(arg)
            hide_next = arg.startswith("-") and not eq and is_secret_key(arg.lstrip("-"))
    return out


def redact_text(text: str) -> str:
    """A command line or path as one string, with secret values masked (see :func:`redact_args`)."""
    return " ".join(redact_args(text.split())) if text else text
