"""Handlers for site-worker tests (:mod:`clinfuse.federation.site_worker` imports them by name)."""

from __future__ import annotations

import os

_served = 0


def echo(header: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
    """Replies with this process's pid and how many requests it served, and the blobs reversed."""
    global _served
    _served += 1
    if header.get("fail"):
        raise ValueError(f"asked to fail ({header['fail']})")
    if header.get("die"):
        os._exit(3)
    return {"pid": os.getpid(), "served": _served}, [blob[::-1] for blob in blobs]
