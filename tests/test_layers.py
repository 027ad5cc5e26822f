"""Each invertible layer: exact inverse, float64 gradcheck (input, condition and parameters), orthogonality."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import redraw_zero_init_, relative_error
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from bundle.networks import (
    AdditiveCoupling,
    InverseOf,
    InvertibleAttention,
    OrthogonalChannelMixing,
    OrthogonalDownsampling,
    checkerboard_indices,
    haar_matrix,
    on_tensor_steps,
)

COND_DIM = 3


def make_layer(name: str, spatial_dims: int):
    """(layer, input channels, whether the layer takes the condition)."""
    if name == "coupling":
        return AdditiveCoupling(spatial_dims, 4, COND_DIM), 4, True
    if name == "mixing":
        return OrthogonalChannelMixing(spatial_dims, 3), 3, False
    if name == "downsampling":
        return OrthogonalDownsampling(spatial_dims, 2), 2, False
    if name == "upsampling":
        return InverseOf(OrthogonalDownsampling(spatial_dims, 2)), 2 * 2**spatial_dims, False
    if name == "attention_heads":  # 2 heads, queries and keys 3 wide (not channels // heads)
        return InvertibleAttention(spatial_dims, 4, parity=1, num_heads=2, key_channels=3), 4, False
    if name.startswith("attention"):
        return InvertibleAttention(spatial_dims, 2, parity=int(name[-1])), 2, False
    raise KeyError(name)


LAYERS = ["coupling", "mixing", "downsampling", "upsampling", "attention0", "attention1", "attention_heads"]


def engine_reverse(layer, y, grad_y, cond, overwrite=False):
    """``layer``'s reverse as a sequence runs it: its steps (one per link of a coupling: on_tensor_steps)
    reversed from the last, each after the first writing over the results of the one before."""
    grad_cond, grad_params = None, []
    for position, step in enumerate(reversed(on_tensor_steps(layer))):
        (y,), (grad_y,), g_cond, g_params = step.reverse((y,), (grad_y,), cond, (overwrite or position > 0,))
        grad_cond = g_cond if grad_cond is None else grad_cond + g_cond
        grad_params = g_params + grad_params
    return (y,), (grad_y,), grad_cond, grad_params


def layer_input(channels: int, spatial_dims: int, name: str, dtype=torch.float64) -> torch.Tensor:
    size = 2 if name == "upsampling" else 4
    return torch.randn(2, channels, *([size] * spatial_dims), dtype=dtype)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_is_exact(name, spatial_dims):
    torch.manual_seed(0)
    layer, channels, conditioned = make_layer(name, spatial_dims)
    redraw_zero_init_(layer, std=0.3).double()
    x = layer_input(channels, spatial_dims, name)
    cond = torch.randn(2, COND_DIM, dtype=torch.float64) if conditioned else None
    y = layer(x, cond)
    if y.shape == x.shape:
        assert relative_error(y, x) > 1e-2  # the redrawn layer is not the identity
    assert relative_error(layer.inverse(y, cond), x) < 1e-12
    assert relative_error(layer(layer.inverse(y, cond), cond), y) < 1e-12


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_layer_gradcheck_float64(name, spatial_dims, direction, one_torch_thread):
    """gradcheck w.r.t. the input, the condition and every parameter, in both directions."""
    torch.manual_seed(1)
    layer, channels, conditioned = make_layer(name, spatial_dims)
    redraw_zero_init_(layer, std=0.3).double()
    x = layer_input(channels, spatial_dims, name)
    if direction == "inverse":
        with torch.no_grad():
            x = layer(x, torch.randn(2, COND_DIM, dtype=torch.float64) if conditioned else None)
    module = layer if direction == "forward" else InverseOf(layer)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    cond = [torch.randn(2, COND_DIM, dtype=torch.float64, requires_grad=True)] if conditioned else []

    def fn(x, *rest):
        c, values = (rest[0], rest[1:]) if conditioned else (None, rest)
        return functional_call(module, dict(zip(names, values, strict=True)), (x, c), strict=True)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *cond, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_haar_matrix_is_orthonormal_and_matches_pixelunshuffle_order():
    for d in (2, 3):
        h = haar_matrix(d)
        assert torch.allclose(h @ h.T, torch.eye(2**d, dtype=torch.float64), atol=1e-14)
        assert torch.allclose(h[0], torch.full((2**d,), 2 ** (-d / 2), dtype=torch.float64))
    # at initialisation the first coefficient of each patch is its mean × 2^(d/2)
    down = OrthogonalDownsampling(3, 1)
    x = torch.randn(1, 1, 4, 4, 4)
    y = down(x)
    patch_mean = torch.nn.functional.avg_pool3d(x, 2)
    assert torch.allclose(y[:, :1], patch_mean * 2**1.5, atol=1e-6)


@pytest.mark.parametrize("layer_cls, channels", [(OrthogonalDownsampling, 3), (OrthogonalChannelMixing, 16)])
def test_learned_orthogonal_matrices_stay_orthogonal_after_optimizer_steps(layer_cls, channels):
    torch.manual_seed(0)
    layer = layer_cls(3, channels)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05)
    x = torch.randn(2, channels, 4, 4, 4)
    target = torch.randn_like(layer(x))
    for _ in range(20):
        optimizer.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimizer.step()
    q = layer.matrices() if hasattr(layer, "matrices") else layer.matrix()
    assert layer.generator.abs().max() > 0.1  # the matrices really moved
    eye = torch.eye(q.shape[-1]).expand_as(q)
    assert (q.transpose(-1, -2) @ q - eye).norm(dim=(-2, -1)).max() <= 1e-5


def test_attention_weights_are_bounded_and_division_amplifies_rounding_by_at_most_two():
    """With tanh saturated, f(y₁) spans [1/2, 2]; a perturbation δ of the attended values a (as rounding
    makes) changes the reconstructed y₂ = a ⊘ f(y₁) by δ ⊘ f(y₁): at most 2|δ| elementwise, with the factor
    2 nearly reached; the kept half y₁ (and so f) is not changed at all."""
    torch.manual_seed(0)
    attention = redraw_zero_init_(InvertibleAttention(3, 4), std=50.0).double()  # saturate tanh
    f = attention.weights(torch.randn(2, 4, 32, dtype=torch.float64) * 10)
    assert f.min() >= 0.5 - 1e-12 and f.max() <= 2.0 + 1e-12
    assert f.max() > 1.9 and f.min() < 0.55
    x = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64) * 10
    kept, modified = checkerboard_indices((4, 4, 4), attention.parity, torch.device("cpu"))
    with torch.no_grad():
        a = attention(x)
        delta = torch.zeros_like(a).flatten(2)
        delta[:, :, modified] = torch.randn(2, 4, len(modified), dtype=torch.float64) * 1e-6
        change = (attention.inverse(a + delta.view_as(a)) - x).flatten(2)
    assert torch.equal(change[:, :, kept], torch.zeros_like(change[:, :, kept]))
    amplification = change[:, :, modified].abs() / delta[:, :, modified].abs()
    assert amplification.max() <= 2.0 * (1 + 1e-6)
    assert amplification.max() > 1.9 and amplification.min() < 0.55  # the whole range [1/2, 2] is used


class _RecordOps(TorchDispatchMode):
    """Names every aten operator that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def test_attention_takes_the_fused_sdpa_kernel_forward_and_backward():
    """The math path forms the N² score matrix (``bmm`` and ``softmax``); the fused kernel does not. SDPA takes
    the math path whenever its value tensor is not a plain strided view, as a transposed token view is."""
    attention = redraw_zero_init_(InvertibleAttention(3, 8, num_heads=2), std=0.5)
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    with _RecordOps() as ops:
        attention.weights(attention.kept(x)).sum().backward()
    fused = {name for name in ops.names if name.startswith("_scaled_dot_product_flash_attention")}
    assert len(fused) == 2, sorted(ops.names)  # forward and backward
    assert not {name for name in ops.names if "softmax" in name or name.startswith("bmm")}, sorted(ops.names)


def test_checkerboard_pairs_kept_and_modified_voxels():
    kept, modified = checkerboard_indices((4, 4, 6), parity=0, device=torch.device("cpu"))
    assert len(kept) == len(modified) == 48
    assert set(kept.tolist()).isdisjoint(modified.tolist())
    assert sorted(kept.tolist() + modified.tolist()) == list(range(96))
    coords = torch.stack(torch.unravel_index(kept, (4, 4, 6))).sum(0)
    assert (coords % 2 == 0).all()
    with pytest.raises(ValueError, match="even last spatial axis"):
        checkerboard_indices((4, 4, 5), 0, torch.device("cpu"))


def test_coupling_requires_condition_when_built_with_one():
    layer = AdditiveCoupling(2, 4, COND_DIM)
    with pytest.raises(ValueError, match="cond=None"):
        layer(torch.randn(1, 4, 4, 4))


def test_alpha_default_is_ln2():
    assert math.isclose(InvertibleAttention(2, 2).alpha, math.log(2.0))


@pytest.mark.parametrize("name", ["coupling", "attention0", "attention1"])
@pytest.mark.parametrize("rows_per_chunk, cond_batch", [(None, 3), (1, 3), (2, 3), (1, 1)])
def test_coupling_reverse_matches_plain_autograd_in_any_batch_chunks(name, rows_per_chunk, cond_batch):
    """The engine's reverse step (rebuild x, then its gradients, the condition's and the parameters') and
    the forward/inverse without autograd: whole batch, one sample at a time, in uneven chunks (2 + 1
    samples) and with one broadcast condition; into copies, or overwriting y and ∂L/∂y."""
    torch.manual_seed(2)
    layer, channels, conditioned = make_layer(name, 3)
    redraw_zero_init_(layer, std=0.3).double()
    links = list(layer.layers) if name == "coupling" else [layer]
    x = torch.randn(3, channels, 4, 4, 4, dtype=torch.float64)
    chunks = []
    for link in links:
        if rows_per_chunk is not None:
            link.chunk_elements = rows_per_chunk * x[0].numel()
        original = link._reverse_chunk_
        link._reverse_chunk_ = lambda y, *args, _original=original: chunks.append(y.shape[0]) or _original(y, *args)
    cond = torch.randn(cond_batch, COND_DIM, dtype=torch.float64, requires_grad=True) if conditioned else None
    grad_y = torch.randn_like(x)
    params = list(layer.parameters())
    x_leaf = x.clone().requires_grad_(True)
    y = layer(x_leaf, cond)
    expected = torch.autograd.grad(y, [x_leaf, *([cond] if conditioned else []), *params], grad_y)
    y = y.detach()
    with torch.no_grad():
        assert relative_error(layer(x, cond), y) < 1e-12  # forward and inverse without autograd, chunked alike
        assert relative_error(layer.inverse(y, cond), x) < 1e-12
        y_kept, grad_y_kept = y.clone(), grad_y.clone()
        results = engine_reverse(layer, y, grad_y, cond)
        assert torch.equal(y, y_kept) and torch.equal(grad_y, grad_y_kept)  # not told it may overwrite them
        overwritten = engine_reverse(layer, y, grad_y, cond, overwrite=True)
        assert overwritten[0][0] is y and overwritten[1][0] is grad_y  # now x and ∂L/∂x, in place
    assert chunks == {None: [3], 1: [1, 1, 1], 2: [2, 1]}[rows_per_chunk] * len(links) * 2
    for (x_rebuilt,), (grad_x,), grad_cond, grad_params in (results, overwritten):
        assert relative_error(x_rebuilt, x) < 1e-12
        assert relative_error(grad_x, expected[0]) < 1e-12
        if conditioned:
            assert grad_cond.shape == cond.shape and relative_error(grad_cond, expected[1]) < 1e-12
        else:
            assert grad_cond is None
        for g, e in zip(grad_params, expected[1 + conditioned :], strict=True):
            assert e.norm() > 0 and relative_error(g, e) < 1e-12


def test_channel_mixing_reverse_matches_plain_autograd():
    """The hand-written reverse of the orthogonal 1×1 convolution: x = Qᵀy, ∂L/∂x = Qᵀ∂L/∂y, ∂L/∂A."""
    torch.manual_seed(3)
    layer, channels, _ = make_layer("mixing", 3)
    redraw_zero_init_(layer, std=0.3).double()
    x = torch.randn(3, channels, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    expected = torch.autograd.grad(y, [x, layer.generator], grad_y)
    y = y.detach()
    with torch.no_grad():
        results = layer.reverse(y.clone(), grad_y.clone(), None)
        overwritten = layer.reverse(y, grad_y, None, overwrite=True)
    assert overwritten[0][0] is y and overwritten[1][0] is grad_y
    for (x_rebuilt,), (grad_x,), grad_cond, (grad_generator,) in (results, overwritten):
        assert grad_cond is None
        assert relative_error(x_rebuilt, x) < 1e-12
        assert relative_error(grad_x, expected[0]) < 1e-12
        assert expected[1].norm() > 0 and relative_error(grad_generator, expected[1]) < 1e-12


def test_recompute_norms_stores_fewer_tensors_and_keeps_values_and_gradients():
    """A coupling built with ``recompute_norms`` stores 4 instead of 7 tensors of F's input size under
    autograd, and its output, plain-autograd gradients and engine reverse match the default's."""
    torch.manual_seed(5)
    default = redraw_zero_init_(AdditiveCoupling(3, 4, COND_DIM), std=0.3).double()
    lean = AdditiveCoupling(3, 4, COND_DIM, recompute_norms=True).double()
    lean.load_state_dict(default.state_dict())
    x = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    cond = torch.randn(2, COND_DIM, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn_like(x)
    half = x[:, :2].shape
    results = {}
    for name, layer in (("default", default), ("lean", lean)):
        stored = []
        x_leaf = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, stored=stored: stored.append(t.shape) or t, lambda t: t
        ):
            y = layer.layers[0].function(x_leaf[:, 2:], cond)
        results[name + "_stored"] = sum(shape == half for shape in stored)
        y = layer(x_leaf, cond)
        params = list(layer.parameters())
        results[name] = (y, *torch.autograd.grad(y, [x_leaf, cond, *params], grad_y))
        with torch.no_grad():
            results[name + "_reverse"] = engine_reverse(layer, y.detach().clone(), grad_y.clone(), cond)
    assert results["default_stored"] == 7 and results["lean_stored"] == 4
    for a, b in zip(results["lean"], results["default"], strict=True):
        assert b.norm() > 0 and relative_error(a, b) < 1e-12
    (x_lean,), (gx_lean,), gc_lean, gp_lean = results["lean_reverse"]
    assert relative_error(x_lean, x) < 1e-12 and relative_error(gx_lean, results["default"][1]) < 1e-12
    assert relative_error(gc_lean, results["default"][2]) < 1e-12
    assert all(relative_error(g, e) < 1e-12 for g, e in zip(gp_lean, results["default"][3:], strict=True))


@pytest.mark.parametrize("spatial_dims, shape", [(3, (1, 8, 16, 16, 16)), (2, (1, 4, 32, 32))])
def test_same_conv_takes_onednn_at_batch_one_and_matches_the_padded_convolution(spatial_dims, shape):
    from torch.profiler import profile

    from bundle.networks.convolution import same_conv

    torch.manual_seed(0)
    conv = same_conv(spatial_dims, shape[1], 6)
    x = torch.randn(shape, requires_grad=True)
    with profile() as prof:
        y = conv(x)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
    kernels = {event.key for event in prof.key_averages()}
    assert "aten::mkldnn_convolution" in kernels and not any(k.startswith("aten::slow_conv") for k in kernels), kernels
    ours = (y.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    conv.zero_grad()
    convolve = torch.nn.functional.conv3d if spatial_dims == 3 else torch.nn.functional.conv2d
    reference = convolve(x, conv.weight, conv.bias, padding=1)
    reference.backward(grad_y)
    for a, b in zip(ours, (reference.detach(), x.grad, conv.weight.grad, conv.bias.grad), strict=True):
        assert a.shape == b.shape and relative_error(a, b) < 1e-5


def test_same_conv_leaves_other_inputs_to_pytorch_and_rejects_even_kernels():
    from bundle.networks.convolution import same_conv

    conv = same_conv(3, 4, 4).double()
    for x in (torch.randn(1, 4, 7, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, 8, dtype=torch.float64)):
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1)
        assert torch.equal(conv(x), expected)  # odd length, float64, batch 3: PyTorch's own convolution
    for conv, x in (
        (same_conv(3, 64, 64), torch.randn(1, 64, 4, 4, 4)),  # fewer than 2 voxels per channel
        (same_conv(3, 4, 4, kernel_size=5), torch.randn(1, 4, 8, 8, 8)),
    ):  # oneDNN takes k = 5
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=conv.padding)
        assert torch.equal(conv(x), expected)
    conv = same_conv(3, 4, 4)
    traced = torch.jit.trace(conv, torch.randn(1, 4, 8, 8, 8))  # traced at batch 1, run at batch 2
    x = torch.randn(2, 4, 8, 8, 8)
    assert relative_error(traced(x), conv(x)) < 1e-6
    with pytest.raises(ValueError, match="odd kernel_size"):
        same_conv(3, 4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        same_conv(1, 4, 4)
