"""Headers the policy door owes a message, one per reply.

A policy reply carries one action, so only one ``PREPEND`` per request. Checks
may want several headers on a message (``Received-SPF``, ``X-Greylist``) and
may return the same header for every recipient. This memory, keyed by
Postfix's ``instance`` attribute (one value per message transaction), emits
each header name at most once per message and keeps the rest for the next
request of the same message: the next recipient, or the DATA stage when
``check_policy_service`` is also listed in ``smtpd_data_restrictions``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from mxguard.core.transaction import HeaderEdit

# Messages in flight whose headers are remembered (least recently asked go first).
# An entry lives for one message transaction, and Postfix runs at most
# default_process_limit (100) smtpd sessions at a time, so 4096 leaves a margin of
# 40; 20,000 entries (~650 bytes each) held 13 MB in a flood of new senders
# (bench/policy_bench.py --checks full) and bought nothing.
MAX_MESSAGES = 4096


@dataclass
class _Pending:
    emitted: set[str] = field(default_factory=set)
    queue: list[HeaderEdit] = field(default_factory=list)


class HeaderMemory:
    def __init__(self, size: int = MAX_MESSAGES) -> None:
        self.size = size
        self._by_instance: OrderedDict[str, _Pending] = OrderedDict()

    def next_header(self, instance: str, new: list[HeaderEdit]) -> HeaderEdit | None:
        """Queue ``new`` for this message and return the header to prepend now."""
        if not instance:  # no message identity: best effort, first header only
            return new[0] if new else None
        pending = self._by_instance.get(instance)
        if pending is None:
            if not new:
                return None
            pending = self._by_instance[instance] = _Pending()
            if len(self._by_instance) > self.size:
                self._by_instance.popitem(last=False)
        else:
            self._by_instance.move_to_end(instance)
        queued = {h.name.lower() for h in pending.queue}
        for h in new:
            name = h.name.lower()
            if name not in pending.emitted and name not in queued:
                pending.queue.append(h)
                queued.add(name)
        if not pending.queue:
            return None
        header = pending.queue.pop(0)
        pending.emitted.add(header.name.lower())
        return header
