"""The site's Flower mods around clinfuse's handlers: client-level DP clipping that passes a
declining site's reply through, on the Message-API path and on Flower's legacy (SecAgg+) path."""

from __future__ import annotations

from flwr.app import Context, Message

from clinfuse.federation import protocol


def client_dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server runs client-level DP, passing declines through.

    The server's DP wrapper puts ``clipping_norm`` in the train config; without it this mod does
    nothing. Flower's mod insists on one ArrayRecord in the reply, which a declining site does
    not send: the decline is handed back unchanged (there is no update to clip).
    """
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.clientapp.mod import fixedclipping_mod

    if protocol.CLIPPING_NORM not in protocol.round_config(msg):
        return call_next(msg, context)
    declined: list[Message] = []

    def inner(m: Message, c: Context) -> Message:
        out = call_next(m, c)
        if not out.has_error() and protocol.ARRAYS not in out.content.array_records:
            declined.append(out)
            # a zero update for the mod to clip; the real (declining) reply is returned instead
            zero = RecordDict({protocol.ARRAYS: ArrayRecord({k: Array(a.numpy()) for k, a in
                                                             m.content[protocol.ARRAYS].items()}),
                               protocol.METRICS: out.content[protocol.METRICS]})
            return Message(zero, reply_to=m)
        return out

    clipped = fixedclipping_mod(msg, context, inner)
    return declined[0] if declined else clipped


def legacy_clipping_mod(msg, context: Context, call_next):
    """Flower's legacy ``fixedclipping_mod`` when the server's legacy DP wrapper sent a clipping
    norm (client-level DP), else nothing: the site need not be told whether client DP is on."""
    from flwr.client.mod import fixedclipping_mod
    from flwr.compat.common import recorddict_compat as compat

    if protocol.CLIPPING_NORM in compat.recorddict_to_fitins(msg.content, keep_input=True).config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
