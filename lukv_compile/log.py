"""lukv's one logger, and messages said once per process (a rewrite left exact, a short prompt kept whole)."""

from __future__ import annotations

import logging

log = logging.getLogger("lukv_compile")
_reported: set[str] = set()


def report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning(message)
