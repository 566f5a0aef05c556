import pytest

from tedmoe.parallel.topology import ParallelDims, Topology, axis_groups


def groups(world, tp, ep, axis):
    return axis_groups(ParallelDims(world, tp, ep), axis)


def test_paper_layout_g16_tp2_ep4():
    assert groups(16, 2, 4, "ep") == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    assert groups(16, 2, 4, "edp") == [[0, 8], [2, 10], [4, 12], [6, 14], [1, 9], [3, 11], [5, 13], [7, 15]]
    assert sorted(groups(16, 2, 4, "tp")) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert groups(16, 2, 4, "dp") == [list(range(0, 16, 2)), list(range(1, 16, 2))]


@pytest.mark.parametrize("world,tp,ep", [(1, 1, 1), (2, 2, 1), (4, 1, 4), (8, 2, 2), (8, 4, 2), (12, 3, 2),
                                         (16, 4, 4), (24, 2, 3), (32, 8, 2)])
def test_groups_partition_the_world_and_agree_with_coords(world, tp, ep):
    dims = ParallelDims(world, tp, ep)
    for axis in ("dp", "tp", "ep", "edp", "sp", "dsp", "world"):
        gs = groups(world, tp, ep, axis)
        assert sorted(r for g in gs for r in g) == list(range(world)), axis
        assert all(len(g) == dims.size(axis) for g in gs)
        for g in gs:  # a rank's position inside its group is its coordinate on that axis
            assert [dims.coords(r)[axis] for r in g] == list(range(len(g)))
    for r in range(world):
        c = dims.coords(r)
        assert r == (c["edp"] * ep + c["ep"]) * tp + c["tp"]
        assert c["dp"] == c["edp"] * ep + c["ep"]
    tp_groups = groups(world, tp, ep, "tp")
    assert all(g == list(range(g[0], g[0] + tp)) for g in tp_groups)  # TP innermost: consecutive ranks
    for g in groups(world, tp, ep, "ep"):  # EP: consecutive ranks of one DP group
        assert [dims.coords(r)["dp"] for r in g] == list(range(g[0] // tp, g[0] // tp + ep))


def test_single_process_topology_has_identity_axes():
    topo = Topology.single()
    for axis in ("dp", "tp", "ep", "edp", "sp", "dsp", "world"):
        a = topo.axis(axis)
        assert (a.size, a.rank, a.ranks, a.group) == (1, 0, (0,), None)


@pytest.mark.parametrize("args,message", [
    ((8, 3, 1), "tp=3 does not divide world_size=8; choose tp from the divisors of 8: [1, 2, 4, 8]"),
    ((8, 2, 3), "ep=3 does not divide the data-parallel size dp=4 (world_size=8 / tp=2); choose ep from [1, 2, 4]"),
    ((8, 4, 4), "ep=4 does not divide the data-parallel size dp=2"),
    ((0, 1, 1), "world_size=0 must be a positive integer"),
    ((4, 1, 0), "ep=0 must be a positive integer"),
])
def test_invalid_degrees_name_numbers_and_fix(args, message):
    with pytest.raises(ValueError) as err:
        ParallelDims(*args)
    assert message in str(err.value)


def test_topology_validates_before_creating_groups():
    # torch.distributed is not initialised here: bad degrees must fail on the degrees, not on init.
    with pytest.raises(ValueError, match="tp=3 does not divide world_size=4"):
        Topology(4, tp=3)
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised first"):
        Topology(4, tp=2)


def test_unknown_axis():
    with pytest.raises(ValueError, match="unknown mesh axis 'pp'; valid axes are dp, tp, ep, edp, sp, dsp, world"):
        Topology.single().axis("pp")


def sp_groups(world, tp, ep, sp, axis):
    return sorted(axis_groups(ParallelDims(world, tp, ep, sp), axis))


def test_sequence_parallel_layout():
    # world 8 = SP 2 x TP 2 x DP 2; token rank = rank // 2; EP 2 pairs the two chunks of a sequence
    assert sp_groups(8, 2, 2, 2, "sp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sp_groups(8, 2, 2, 2, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sp_groups(8, 2, 2, 2, "dsp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert sp_groups(8, 2, 2, 2, "ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sp_groups(8, 2, 2, 2, "edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # EP wider than SP spans sequences too: SP 2 x DP 2, EP 4 over all token ranks
    assert sp_groups(4, 1, 4, 2, "ep") == [[0, 1, 2, 3]] and sp_groups(4, 1, 4, 2, "sp") == [[0, 1], [2, 3]]
    for world, tp, ep, sp in [(8, 2, 2, 2), (8, 1, 4, 2), (16, 2, 2, 4), (8, 2, 1, 4), (12, 1, 3, 2)]:
        dims = ParallelDims(world, tp, ep, sp)
        for r in range(world):
            c = dims.coords(r)
            assert r == c["dsp"] * tp + c["tp"] == (c["edp"] * ep + c["ep"]) * tp + c["tp"]
            assert c["dsp"] == c["dp"] * sp + c["sp"]
        for axis in ("dp", "sp", "dsp", "ep", "edp"):
            for g in axis_groups(dims, axis):
                assert [dims.coords(r)[axis] for r in g] == list(range(len(g)))
    with pytest.raises(ValueError, match="sp=3 does not divide world_size / tp = 4"):
        ParallelDims(8, 2, 1, 3)
    with pytest.raises(ValueError, match="ep=8 does not divide dp x sp=4"):
        ParallelDims(8, 2, 8, 2)
