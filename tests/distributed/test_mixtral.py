"""A Hugging Face Mixtral checkpoint (written by ``transformers`` itself) loaded into TED layouts,
each rank reading only its slices: the logits equal transformers' on the same ids."""

import pytest
import torch

from tedmoe.interop import hf
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology
from tests.unit.test_mixtral import TOL, hf_model, ids

transformers = pytest.importorskip("transformers")

LAYOUTS = [(2, 2), (1, 4), (2, 1)]  # (tp, ep) on 4 ranks; dp = 4 / tp


def check_layouts(path, x):
    cfg, out = hf.read_config(path), {}
    for tp, ep in LAYOUTS:
        model = GPTMoE(cfg, Topology(4, tp=tp, ep=ep)).eval()
        hf.load_into(model, path)
        out[(tp, ep)] = model.logits(x)
    return out


def assert_layouts_give_transformers_logits(world, model, path, x):
    """Every rank of every layout in LAYOUTS, loading ``path`` itself, gives ``model``'s logits on ``x``."""
    with torch.no_grad():
        want = model(x).logits
    for rank, results in enumerate(world.run(check_layouts, str(path), x)):
        for (tp, ep), logits in results.items():
            torch.testing.assert_close(logits, want, **TOL, msg=lambda m: f"rank {rank} tp={tp} ep={ep}: {m}")


def test_layouts_load_a_transformers_checkpoint_with_equal_logits(world4, tmp_path):
    assert_layouts_give_transformers_logits(world4, *hf_model(tmp_path), ids())


def test_one_process_load_into_equals_the_full_load(tmp_path):
    _, path = hf_model(tmp_path)
    cfg, state = hf.load(path)
    model = GPTMoE(cfg, Topology.single())
    hf.load_into(model, path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
