"""Distillation from a teacher: the vocab-parallel KL against torch's ``kl_div`` and the model's
loss against one computed by hand from both models' logits."""

import pytest
import torch
import torch.nn.functional as F

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.tensor_parallel import vocab_parallel_kl
from tedmoe.parallel.topology import Topology


def test_kl_and_its_gradient_equal_torch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=g, requires_grad=True), torch.randn(6, 50, generator=g) * 3
    s_ref = s.detach().clone().requires_grad_(True)
    axis = Topology.single().axis("tp")
    for T in (1.0, 2.5):
        ours = vocab_parallel_kl(s, t, axis, T)
        ref = F.kl_div(F.log_softmax(s_ref / T, -1), F.log_softmax(t / T, -1), log_target=True,
                       reduction="none").sum(-1)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        w = torch.rand(6, generator=g)
        (ours * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-7)
        s.grad = s_ref.grad = None
    assert vocab_parallel_kl(t, t, axis).abs().max() < 1e-6  # no divergence from itself


def _model(seed, experts=4):
    moe = MoEConfig(ffn_hidden_size=16, num_experts=experts, top_k=2, dropless=True)
    model = GPTMoE(ModelConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=32,
                               max_seq_len=12, moe=moe), Topology.single())
    model.init_weights(seed)
    return model


def test_the_loss_mixes_cross_entropy_and_kl():
    student, teacher = _model(0), _model(5, experts=6)
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    targets[0, :4] = -100  # ignored targets count in neither term
    keep = targets != -100
    ce = F.cross_entropy(student.logits(ids)[keep], targets[keep])
    w, T = 0.3, 2.0
    kl = F.kl_div(F.log_softmax(student.logits(ids)[keep] / T, -1), F.log_softmax(teacher.logits(ids)[keep] / T, -1),
                  log_target=True, reduction="batchmean")
    student.set_teacher(teacher, w, T)
    loss, parts = student(ids, targets)
    aux = student.config.aux_loss_coef * parts["aux"] + student.config.z_loss_coef * parts["z"]
    torch.testing.assert_close(parts["kd"], kl * T * T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (1 - w) * ce + w * T * T * kl + aux, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained
    assert not any(k.startswith("teacher") for k in student.state_dict())  # nor saved with the student
    student.set_teacher(None)
    assert "kd" not in student(ids, targets)[1]


def test_a_teacher_of_another_vocabulary_is_refused():
    student = _model(0)
    other = GPTMoE(ModelConfig(vocab_size=48, hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32,
                               max_seq_len=12), Topology.single())
    with pytest.raises(ValueError, match="vocabulary"):
        student.set_teacher(other)
