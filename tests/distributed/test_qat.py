"""Quantisation-aware training (binary, ternary) and N:M sparsity in TED layouts: the single-process
loss, gradients and curve (the row statistics that tensor parallelism splits are all-reduced; N:M
groups stay inside a rank's columns), with masks refreshed during the run."""

import pytest
import torch

import tests.distributed.test_engine as te
from tedmoe.compress import qat
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel.topology import Topology
from tests.distributed.harness import assert_matches_reference, train_and_gather

LAYOUTS = [(2, 2, "none"), (4, 1, "cac")]
METHODS = ["binary", "ternary", "nm"]
STEPS = 5


def teacher(topology):
    """Another model of the same vocabulary (its own weights and experts), in the same layout."""
    cfg = te.model_config()
    cfg.moe.num_experts = 8
    model = GPTMoE(cfg, topology)
    model.init_weights(seed=7)
    return model


def run(topology, method, checkpointing="none", distill=None):
    model = GPTMoE(te.model_config(), topology)
    model.init_weights(seed=0)
    transforms = qat.apply(model, method, n=2, m=4, refresh_every=2) if method != "none" else []
    if distill is not None:
        model.set_teacher(teacher(topology), *distill)
    apply_checkpointing(model, checkpointing)
    engine = te.Engine(model, topology, te.train_config())

    def batches(step):
        for t in transforms:
            t.step = step  # masks refresh at steps 0, 2, 4
        return te.rank_batches(step, topology)

    return train_and_gather(engine, batches, STEPS, te.MICRO_BATCHES)


def check_layouts(method, distill=None, layouts=LAYOUTS):
    out = {}
    for tp, ep, ckpt in layouts:
        result = run(Topology(4, tp=tp, ep=ep), method, ckpt, distill)
        out[(tp, ep, ckpt)] = result if torch.distributed.get_rank() == 0 else None
    return out


@pytest.mark.parametrize("method", METHODS)
def test_qat_matches_single_process(world4, method):
    reference = run(Topology.single(), method)
    float_run = te.run(Topology.single(), te.train_config(), steps=1)
    assert abs(reference[0] - float_run[0]) > 1e-3  # the transformed weights change the loss
    for (tp, ep, ckpt), result in world4.run(check_layouts, method)[0].items():
        assert_matches_reference(f"{method} tp={tp} ep={ep} checkpointing={ckpt}", result, reference)


DISTILL = [("ternary", (0.5, 2.0)), ("none", (1.0, 1.0))]  # (method, (weight, temperature))


@pytest.mark.parametrize("method,distill", DISTILL)
def test_distillation_matches_single_process(world4, method, distill):
    """The KL term over the vocabulary that tp splits, with a teacher whose experts ep splits."""
    reference = run(Topology.single(), method, distill=distill)
    plain = run(Topology.single(), method)
    assert abs(reference[0] - plain[0]) > 1e-3  # the teacher changes the loss
    layouts = LAYOUTS + [(1, 4, "none")]
    for (tp, ep, ckpt), result in world4.run(check_layouts, method, distill, layouts)[0].items():
        assert_matches_reference(f"distil {method} {distill} tp={tp} ep={ep} checkpointing={ckpt}", result, reference)


def test_the_transforms_compute_what_they_say():
    w = torch.tensor([[0.5, -1.0, 0.1, 2.0], [0.0, -0.3, 0.3, 0.6]])
    binary = qat.WeightTransform("binary", 1, 4)._target(w)
    assert torch.allclose(binary, torch.sign(w) * w.abs().mean(1, keepdim=True))
    ternary = qat.WeightTransform("ternary", 1, 4)._target(w)
    # row 0: mean|w| = 0.9, threshold 0.63: keeps -1.0 and 2.0 with magnitude 1.5
    assert torch.allclose(ternary[0], torch.tensor([0.0, -1.5, 0.0, 1.5]))
    nm = qat.WeightTransform("nm", 1, 4, n=2, m=4)._target(w)
    assert torch.equal(nm[0] != 0, torch.tensor([False, True, False, True]))
    w.requires_grad_(True)
    qat.WeightTransform("binary", 1, 4)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through
