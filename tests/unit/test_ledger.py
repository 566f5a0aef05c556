import pytest
import torch

from tedmoe.parallel import comm
from tedmoe.parallel.ledger import CommLedger, sent_bytes
from tedmoe.parallel.topology import Axis


def test_sent_bytes_formulas():
    assert sent_bytes("all_reduce", 4, 10, 4) == 2 * 3 * 3 * 4  # ring over chunks of ceil(10/4)=3
    assert sent_bytes("all_reduce", 2, 8, 2) == 2 * 1 * 4 * 2
    assert sent_bytes("all_gather", 4, 6, 4) == 3 * 6 * 4
    assert sent_bytes("reduce_scatter", 4, 24, 4) == 3 * 6 * 4
    assert sent_bytes("all_to_all", 4, 32, 4, send_numel=24) == 96
    assert sent_bytes("all_reduce", 1, 10, 4) == 0
    with pytest.raises(ValueError, match="unknown collective kind 'broadcast'"):
        sent_bytes("broadcast", 4, 10, 4)


def test_ledger_records_totals_and_phases():
    ledger = CommLedger()
    ledger.record("all_reduce", "tp", 72, 40)  # disabled: ignored
    assert ledger.as_dict() == {}
    with ledger.capture():
        ledger.record("all_reduce", "tp", 72, 40)
        ledger.record("all_reduce", "tp", 72, 40)
        ledger.record("all_to_all", "ep", 96, 128, phase="bwd")
        with ledger.phase("recompute"):
            ledger.record("all_to_all", "ep", 96, 128)
    assert not ledger.enabled
    assert ledger.as_dict() == {
        "bwd": {"all_to_all/ep": {"calls": 1, "bytes": 96, "payload": 128}},
        "fwd": {"all_reduce/tp": {"calls": 2, "bytes": 144, "payload": 80}},
        "recompute": {"all_to_all/ep": {"calls": 1, "bytes": 96, "payload": 128}},
    }
    assert ledger.total().bytes == 144 + 96 + 96
    assert ledger.total(kind="all_to_all").calls == 2
    assert ledger.total(kind="all_to_all", phase="bwd").bytes == 96
    assert ledger.total(axis="tp", phase="bwd").calls == 0
    table = ledger.table().splitlines()
    assert table[0].split() == ["phase", "kind", "axis", "calls", "bytes", "sent", "payload"]
    assert table[2].split() == ["bwd", "all_to_all", "ep", "1", "96", "128"]
    assert table[-1].split() == ["total", "4", "336", "336"]
    ledger.reset()
    assert ledger.total().calls == 0


FAKE_TP4 = Axis("tp", 4, 0, (0, 1, 2, 3), None)  # validation runs before any collective


@pytest.mark.parametrize("call", [
    lambda x: comm.reduce_scatter(x, FAKE_TP4, dim=1),
    lambda x: comm.reduce_scatter_along(x, FAKE_TP4, dim=1),
    lambda x: comm.split_along(x, FAKE_TP4, dim=1),
    lambda x: comm.local_slice(x, FAKE_TP4, dim=1),
])
def test_split_dim_not_divisible_names_the_fix(call):
    with pytest.raises(ValueError) as err:
        call(torch.zeros(4, 10))
    assert str(err.value) == ("cannot split dim 1 of a tensor of shape (4, 10) into tp=4 equal parts; "
                              "make its size a multiple of 4 (pad it, or change tp)")


def test_all_to_all_split_errors():
    with pytest.raises(ValueError, match=r"cannot split dim 0 of a tensor of shape \(6, 2\) into tp=4"):
        comm.all_to_all(torch.zeros(6, 2), FAKE_TP4)
    with pytest.raises(ValueError, match="needs in_splits and out_splits of length 4"):
        comm.all_to_all(torch.zeros(6, 2), FAKE_TP4, [3, 3], [3, 3])
    with pytest.raises(ValueError, match=r"in_splits \[1, 1, 1, 1\] sum to 4, but dim 0 of the input is 6"):
        comm.all_to_all(torch.zeros(6, 2), FAKE_TP4, [1, 1, 1, 1], [1, 1, 1, 1])


def test_size_one_axis_is_identity_and_silent():
    one = Axis("tp", 1, 0, (0,), None)
    x = torch.randn(3, 4, requires_grad=True)
    with comm.LEDGER.capture():
        for f in (comm.copy_to_region, comm.reduce_from_region):
            assert f(x, one) is x
        for f in (comm.gather_along, comm.reduce_scatter_along, comm.split_along, comm.gather_split):
            assert f(x, one, 0) is x
        assert comm.all_to_all_autograd(x, one) is x
    assert comm.LEDGER.total().calls == 0
