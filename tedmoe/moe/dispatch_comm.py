"""The bytes of the MoE dispatcher's communication steps, predicted without running them.

``capacity_comm`` follows the numbered steps in ``TEDDispatcher``'s docstring
(``tedmoe/moe/dtd_dispatcher.py``) and builds the ledger a capacity-bounded layer records
(``tedmoe.parallel.ledger`` form), so tests hold the layer to it with ``==`` and the planner
uses it without importing a layer.
"""

from __future__ import annotations

from tedmoe.parallel import ledger


def capacity_comm(num_tokens: int, hidden: int, num_experts: int, top_k: int, capacity: int,
                  tp: int, ep: int, dtd: bool, itemsize: int = 4) -> dict:
    """The ledger (``CommLedger.as_dict()``) of one forward + backward of a capacity-bounded
    MoE layer on one rank, from the steps in ``TEDDispatcher``'s docstring."""
    dtd = dtd and tp > 1
    seg = -(-capacity // tp) if dtd else capacity
    rows = num_experts * seg  # sent and received per rank
    out: dict = {}

    def add(phase, kind, axis, numel, n, item=itemsize, send_numel=None):
        ledger.add(out, phase, kind, axis, n, numel, item, send_numel)

    a2a_send = (num_experts - num_experts // ep) * seg * hidden
    for phase in ("fwd", "bwd"):
        add(phase, "all_to_all", "ep", rows * hidden, ep, send_numel=a2a_send)
        add(phase, "all_to_all", "ep", rows * hidden, ep, send_numel=a2a_send)
    if dtd:
        for phase in ("fwd", "bwd"):
            add(phase, "all_gather", "tp", rows * hidden, tp)
            add(phase, "reduce_scatter", "tp", tp * rows * hidden, tp)
        add("fwd", "all_reduce", "tp", num_tokens * hidden, tp)
        add("bwd", "all_reduce", "tp", num_tokens * top_k, tp, item=4)
    else:
        add("fwd", "all_reduce", "tp", rows * hidden, tp)
    add("bwd", "all_reduce", "tp", num_tokens * hidden, tp)
    return out
