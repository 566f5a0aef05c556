"""Group-wise symmetric INT8/INT4 quantisation and the integer kernels: the rounding bound, INT4
packing, and every kernel's product against the product with the dequantised weight."""

import pytest
import torch

from tedmoe.compress import quant


@pytest.mark.parametrize("bits,group", [(8, 256), (8, 64), (4, 128), (4, 32)])
def test_quantisation_rounds_to_the_nearest_step_of_each_group(bits, group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, 256)
    q, s = quant.quantize(w, bits, group)
    assert q.dtype == torch.int8 and s.shape == (48, 256 // group)
    assert q.max() <= quant.QMAX[bits] and q.min() >= -quant.QMAX[bits] - 1
    err = (quant.dequantize(q, s) - w).abs().reshape(48, -1, group)
    assert (err <= s[..., None] / 2 + 1e-7).all()
    assert (q.reshape(48, -1, group).abs().amax(-1) == quant.QMAX[bits]).all()  # each group's largest is at the edge


def test_int4_packs_two_per_byte_and_unpacks_exactly():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(quant.unpack_int4(packed), q)
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (2, 9, 256), (40, 256)])
@pytest.mark.parametrize("bits,group", [(8, 256), (8, 64), (4, 64), (4, 256)])
def test_the_integer_kernels_equal_the_dequantised_product(shape, bits, group):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(96, 256, generator=g) * 0.05, torch.randn(shape, generator=g)
    q, s = quant.quantize(w, bits, group)
    want = x @ quant.dequantize(q, s).t()
    if bits == 8:  # both paths: the kernel, and the weight dequantised for the call
        torch.testing.assert_close(quant.int8_linear(x, *quant.by_group(q, s), path="kernel"), want,
                                   rtol=1e-5, atol=1e-5)
        got = quant.int8_linear(x, *quant.by_group(q, s), path="dequant")
    else:
        got = quant.int4_linear(x, *quant.int4_kernel_weight(quant.pack_int4(q), s), group)
    assert got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_int8_path_follows_the_cpu_and_the_setting(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert quant.int8_path(1, cpu) == "dequant"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert [quant.int8_path(r, cpu) for r in (1, quant.KERNEL_ROWS, quant.KERNEL_ROWS + 1)] == \
        ["kernel", "kernel", "dequant"]
    monkeypatch.setenv("TEDMOE_INT8_MATMUL", "kernel")
    assert quant.int8_path(100, cpu) == "kernel"
    monkeypatch.setenv("TEDMOE_INT8_MATMUL", "fast")
    with pytest.raises(ValueError, match="TEDMOE_INT8_MATMUL='fast': use auto, kernel or dequant"):
        quant.int8_path(1, cpu)


@pytest.mark.parametrize("rows", [1, 16, 33])
def test_w8a8_multiplies_integers_and_only_adds_the_activation_rounding(rows):
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 128, generator=g) * 0.05, torch.randn(rows, 128, generator=g)
    q, s = quant.quantize(w, 8, 64)
    xq, sx = quant.quantize_tokens(x)
    want = (xq.float() * sx) @ quant.dequantize(q, s).t()  # both sides rounded, product in floats
    got = quant.w8a8_linear(x, *quant.by_group(q, s, transpose=True))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K,group,bits,message", [
    (256, 100, 8, "group size 100 does not divide weight's 256 input columns"),
    (256, 16, 4, "the INT4 kernel takes 32, 64, 128, 256"),
    (96, 64, 8, "does not divide"),
])
def test_group_sizes_that_cannot_work_are_named(K, group, bits, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(torch.zeros(4, K), bits, group)
