"""Which node may speak for which site: the study's roster and the server's check of each reply.

The roster (run config ``roster=/path/roster.yaml``; its format in :mod:`clinfuse.privacy.roster`)
declares the study's sites and the key of each.

:class:`SiteIdentities` is the server's record, for one run, of which node holds which site id.
A reply is accepted as its site's only if its signature verifies (see
:mod:`clinfuse.federation.protocol`), its key is the roster's key for that site id, and no other
node still connected holds that site id; otherwise it is refused, with a reason, and the node is
asked nothing more in this run. Without a roster (simulation, a demo) a site id is bound to the
first key that speaks for it: replies are still signed and a second key or node for the same id
is still refused, but nothing says the first one was the real site, and the log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from clinfuse.privacy.roster import Roster

_log = logging.getLogger("clinfuse.federation")


class SiteIdentities:
    """The server's record, for one run, of which node holds which site id.

    ``roster``: the study's :class:`Roster`, or ``None`` (identities bound on first use, unverified).
    """

    def __init__(self, roster: Roster | None):
        self.roster = roster
        self.holder: dict[str, int] = {}  # site id -> node id
        self.keys: dict[str, str] = {}  # site id -> fingerprint (bound on first use without a roster)
        self.refused_nodes: dict[int, str] = {}  # node id -> why (asked nothing more in this run)

    @property
    def verified(self) -> bool:
        return self.roster is not None

    def site_of(self, node_id: int) -> str | None:
        """The site id ``node_id`` was accepted as in this run, if any."""
        return next((s for s, n in self.holder.items() if n == node_id), None)

    def admit(self, node_id: int, claim, *, connected: Collection[int]) -> str | None:
        """``None`` if the reply of ``node_id`` with ``claim`` (a protocol ``SiteClaim`` or ``None``)
        is accepted as its site's; otherwise the reason it is refused (the node is then refused
        for the rest of the run). ``connected``: the node ids connected now."""
        reason = self._problem(node_id, claim, connected)
        if reason is None:
            previous = self.holder.get(claim.site_id)
            if previous is not None and previous != node_id:
                _log.warning("site %s moved from node %d (no longer connected) to node %d",
                             claim.site_id, previous, node_id)
            self.holder[claim.site_id] = node_id
            self.keys.setdefault(claim.site_id, claim.fingerprint)
        else:
            self.refused_nodes[node_id] = reason
        return reason

    def _problem(self, node_id: int, claim, connected: Collection[int]) -> str | None:
        if node_id in self.refused_nodes:
            return self.refused_nodes[node_id]
        if claim is None:
            return "the reply names no site"
        if not claim.signed:
            return (f"the reply claiming {claim.site_id!r} is not signed by the key it carries for this "
                    "round (altered, replayed or unsigned)")
        if self.roster is not None:
            problem = self.roster.problem(claim.site_id, claim.fingerprint)
            if problem:
                return problem
        elif claim.site_id in self.keys and self.keys[claim.site_id] != claim.fingerprint:
            return (f"site id {claim.site_id!r} is already held by key {self.keys[claim.site_id]} in this "
                    f"run; this reply is signed by {claim.fingerprint}")
        other = next((s for s, n in self.holder.items() if n == node_id and s != claim.site_id), None)
        if other is not None:
            return f"node {node_id} already speaks for {other!r} in this run, now it claims {claim.site_id!r}"
        holder = self.holder.get(claim.site_id)
        if holder is not None and holder != node_id and holder in connected:
            return f"site id {claim.site_id!r} is held by node {holder}, still connected: a second node claims it"
        return None
