"""The spawn harness reports a failing rank's traceback and names ranks that hang."""

import time

import pytest
import torch
import torch.distributed as dist


def rank_and_sum():
    return dist.get_rank(), comm_sum()


def comm_sum():
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return t.item()


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")
    comm_sum()  # rank 0 waits in a collective that rank 1 never joins


def sleep_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(60)


def test_harness_reports_errors_hangs_and_recovers(world2):
    assert world2.run(rank_and_sum) == [(0, 3.0), (1, 3.0)]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        world2.run(fail_on_rank_one)
    msg = str(err.value)
    assert "fail_on_rank_one failed on 2 ranks" in msg
    assert "--- rank 1 ---" in msg and "ValueError: rank one is broken" in msg
    assert "ranks [0] did not finish" in msg  # stuck in the collective: named, then killed
    assert time.monotonic() - t0 < 30
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not finish within the timeout"):
        world2.run(sleep_on_rank_one, timeout=3)
    assert world2.run(rank_and_sum) == [(0, 3.0), (1, 3.0)]  # respawned after the failures
