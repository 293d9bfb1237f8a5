"""The single exception type of the Zero-DB engine."""

from __future__ import annotations


class ZdbError(Exception):
    """An engine refusal or a storage problem.

    For refusals, str(exc) is the reference 0-db error text without the leading '-'
    (e.g. 'Key not found'), so the server can send it as-is.
    """
