"""Every comm primitive's forward and backward on known tensors, and the ledger's exact bytes."""

import torch
import torch.distributed as dist

from tedmoe.parallel import comm
from tedmoe.parallel.comm import LEDGER
from tedmoe.parallel.topology import Topology


def _grad_of(fn, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad


def check_region_pairs(tp):
    axis = Topology(4, tp=tp).axis("tp")
    r, n = axis.rank, axis.size
    x = torch.full((2, 3), float(r + 1))
    total = sum(i + 1 for i in range(n))
    y, g = _grad_of(lambda t: comm.copy_to_region(t, axis), x, torch.full((2, 3), float(10 * (r + 1))))
    assert torch.equal(y, x) and torch.equal(g, torch.full((2, 3), 10.0 * total))
    y, g = _grad_of(lambda t: comm.reduce_from_region(t, axis), x, torch.full((2, 3), 7.0 + r))
    assert torch.equal(y, torch.full((2, 3), float(total))) and torch.equal(g, torch.full((2, 3), 7.0 + r))


def check_gather_and_scatter_pairs(tp):
    axis = Topology(4, tp=tp).axis("tp")
    r, n = axis.rank, axis.size
    full = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8)
    mine = full.chunk(n, 1)[r]
    # all-gather along dim 1; backward reduce-scatters per-rank gradients
    y, g = _grad_of(lambda t: comm.gather_along(t, axis, 1), mine, full * (r + 1))
    assert torch.equal(y, full)
    assert torch.equal(g, mine * sum(i + 1 for i in range(n)))
    # reduce-scatter along dim 0; backward all-gathers
    y, g = _grad_of(lambda t: comm.reduce_scatter_along(t, axis, 0), full * (r + 1), full.chunk(n, 0)[r] + 100)
    assert torch.equal(y, full.chunk(n, 0)[r] * sum(i + 1 for i in range(n)))
    assert torch.equal(g, full + 100)
    # DTD pair: drop to the local slice, gather the slices
    y, g = _grad_of(lambda t: comm.split_along(t, axis, 0), full, full.chunk(n, 0)[r] * -1)
    assert torch.equal(y, full.chunk(n, 0)[r]) and torch.equal(g, -full)
    y, g = _grad_of(lambda t: comm.gather_split(t, axis, 1), mine, full * 3)
    assert torch.equal(y, full) and torch.equal(g, mine * 3)
    # round trips are identities
    assert torch.equal(comm.gather_split(comm.split_along(full, axis, 1), axis, 1), full)


def _a2a_input(r, in_splits):
    """Rows of rank r addressed to rank j carry value 1000*r + 10*j + row index."""
    return torch.cat([torch.tensor([[1000.0 * r + 10 * j + i] * 2 for i in range(k)]).reshape(k, 2)
                      for j, k in enumerate(in_splits)])


def check_all_to_all(uneven):
    topo = Topology(4, tp=1, ep=4)
    axis = topo.axis("ep")
    r, n = axis.rank, axis.size
    split = (lambda src, dst: (src + 2 * dst) % 3 + 1) if uneven else (lambda src, dst: 2)
    in_splits = [split(r, j) for j in range(n)]
    out_splits = [split(j, r) for j in range(n)]
    x = _a2a_input(r, in_splits)
    expect = torch.cat([_a2a_input(j, [split(j, d) for d in range(n)])[sum(split(j, d) for d in range(r)):][:split(j, r)]
                        for j in range(n)])
    args = (in_splits, out_splits) if uneven else ()
    with LEDGER.capture():
        y, g = _grad_of(lambda t: comm.all_to_all_autograd(t, axis, *args), x, expect * 2)
    assert torch.equal(y, expect)
    assert torch.equal(g, x * 2)  # backward is the reverse exchange
    sent = (sum(in_splits) - in_splits[r]) * 2 * 4
    received = (sum(out_splits) - out_splits[r]) * 2 * 4
    assert LEDGER.as_dict() == {
        "fwd": {"all_to_all/ep": {"calls": 1, "bytes": sent, "payload": x.numel() * 4}},
        "bwd": {"all_to_all/ep": {"calls": 1, "bytes": received, "payload": y.numel() * 4}},
    }


def check_ledger_known_collectives():
    topo = Topology(4, tp=4)
    tp = topo.axis("tp")
    with LEDGER.capture():
        comm.all_to_all(torch.randn(4, 8), tp)  # 3 of 4 rows of 8 fp32 leave this rank
        comm.all_reduce(torch.randn(10), tp)
        comm.all_gather(torch.randn(2, 3), tp, dim=1)
        comm.reduce_scatter(torch.randn(8, 3), tp)
        comm.all_reduce(torch.randn(6, dtype=torch.float16), topo.axis("dp"))  # size 1: not a collective
        with LEDGER.phase("step"):
            comm.all_gather(torch.randn(5, dtype=torch.bfloat16), tp)
    assert LEDGER.as_dict() == {
        "fwd": {
            "all_gather/tp": {"calls": 1, "bytes": 3 * 6 * 4, "payload": 24},
            "all_reduce/tp": {"calls": 1, "bytes": 2 * 3 * 3 * 4, "payload": 40},
            "all_to_all/tp": {"calls": 1, "bytes": 96, "payload": 128},
            "reduce_scatter/tp": {"calls": 1, "bytes": 3 * 6 * 4, "payload": 96},
        },
        "step": {"all_gather/tp": {"calls": 1, "bytes": 3 * 5 * 2, "payload": 10}},
    }
    assert "total" in LEDGER.table()


def check_ledger_axis_groups():
    """Collectives really run inside the right groups of the (2,2,2) grid on 8 ranks."""
    topo = Topology(8, tp=2, ep=2)
    rank = dist.get_rank()
    for name in ("tp", "dp", "ep", "edp", "sp", "dsp", "world"):
        got = comm.all_gather(torch.tensor([rank]), topo.axis(name)).tolist()
        assert got == list(topo.axis(name).ranks), (name, got)
    return topo.coords


def test_region_pairs(world4):
    for tp in (2, 4):
        world4.run(check_region_pairs, tp)


def test_gather_and_scatter_pairs(world4):
    for tp in (2, 4):
        world4.run(check_gather_and_scatter_pairs, tp)


def test_all_to_all_even_and_uneven(world4):
    world4.run(check_all_to_all, False)
    world4.run(check_all_to_all, True)


def test_ledger_exact_bytes(world4):
    world4.run(check_ledger_known_collectives)


def test_groups_on_eight_ranks(world8):
    coords = world8.run(check_ledger_axis_groups)
    assert coords[5] == {"dp": 2, "tp": 1, "ep": 0, "edp": 1, "sp": 0, "dsp": 2, "world": 5}
