"""The grouped experts: the GELU MLP's hand-written backward (activation gradient computed in
place) gives autograd's results bit for bit."""

import torch
import torch.nn.functional as F

from tedmoe.config import MoEConfig
from tedmoe.moe.experts import GroupedExperts
from tedmoe.parallel.topology import Topology


def test_gelu_mlp_backward_equals_autograd_bit_for_bit():
    torch.manual_seed(0)
    experts = GroupedExperts(16, MoEConfig(ffn_hidden_size=40, num_experts=4), Topology.single())
    x = torch.randn(4, 50, 16)
    grad = torch.randn(4, 50, 16)
    xa = x.clone().requires_grad_(True)
    y = experts(xa)
    y.backward(grad)
    mine = [xa.grad, experts.w1.grad.clone(), experts.w2.grad.clone()]
    experts.zero_grad()
    xb = x.clone().requires_grad_(True)
    y_ref = torch.bmm(F.gelu(torch.bmm(xb, experts.w1)), experts.w2)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(mine, [xb.grad, experts.w1.grad, experts.w2.grad]))


def test_no_input_gradient_when_the_input_needs_none():
    experts = GroupedExperts(8, MoEConfig(ffn_hidden_size=16, num_experts=2), Topology.single())
    experts(torch.randn(2, 5, 8)).sum().backward()
    assert experts.w1.grad is not None and experts.w2.grad is not None
