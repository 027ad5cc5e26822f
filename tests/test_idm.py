"""The IDM noise predictor: MONAI call signature, padding, gradients, stored bytes against MONAI's U-Net."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import redraw_zero_init_, relative_error
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

from bundle.diffusion import idm_loss_backward, micro_batches
from bundle.networks import (
    AttentionPair,
    CouplingBlock,
    InvertibleAttention,
    InvertibleDiffusionUNet,
    OrthogonalChannelMixing,
)
from scripts.benchmarking import count_parameters, matched_monai_unet, saved_activation_bytes

SMALL = {
    "spatial_dims": 3,
    "in_channels": 2,
    "out_channels": 2,
    "channels": (8, 16, 32),
    "attention_levels": (False, True, True),
}


def make_idm(**overrides) -> InvertibleDiffusionUNet:
    torch.manual_seed(0)
    return redraw_zero_init_(InvertibleDiffusionUNet(**{**SMALL, **overrides}))


def test_output_shape_and_monai_diffusion_inferer_call():
    model = make_idm()
    images = torch.rand(2, 2, 16, 16, 16)
    scheduler = DDPMScheduler(num_train_timesteps=100, schedule="cosine")
    noise, timesteps = torch.randn_like(images), torch.randint(0, 100, (2,))
    prediction = DiffusionInferer(scheduler)(images, model, noise, timesteps)
    assert prediction.shape == images.shape
    assert prediction.abs().sum() > 0


def test_sizes_that_do_not_fit_are_padded_and_cropped_back():
    model = make_idm()
    x = torch.randn(1, 2, 12, 20, 10)
    with torch.no_grad():
        out = model(x, torch.tensor([5]))
        assert out.shape == (1, 2, 12, 20, 10)
        assert model.inverse(out, torch.tensor([5])).shape == x.shape


@pytest.mark.parametrize(
    "spatial_dims, shape", [pytest.param(3, (12, 10, 14), id="3d-12x10x14"), pytest.param(2, (13, 18), id="2d-13x18")]
)
def test_padded_sizes_give_the_corner_of_what_the_zero_padded_input_gives(spatial_dims, shape, one_torch_thread):
    """A size the trunk cannot take is zero-padded at the far end and cropped back from the corner at the
    origin: U(x) equals that corner of U(zero-padded x), and U⁻¹ likewise, so each output voxel sits where
    its input voxel was; the opposite corner differs (the comparison can tell the placements apart)."""
    model = make_idm(spatial_dims=spatial_dims).double()
    divisor = model.trunk.size_divisor
    padding = [p for s in reversed(shape) for p in (0, -s % divisor)]
    x, t = torch.randn(2, 2, *shape, dtype=torch.float64), torch.tensor([5, 60])
    origin = (slice(None), slice(None), *(slice(0, s) for s in shape))
    far_end = (slice(None), slice(None), *(slice(-s, None) for s in shape))
    with torch.no_grad():
        out, out_padded = model(x, t), model(F.pad(x, padding), t)
        assert out.shape == x.shape and all(p > 0 for p in padding[1::2])
        assert torch.equal(out, out_padded[origin])
        assert relative_error(out_padded[far_end], out) > 0.1
        back, back_padded = model.inverse(out, t), model.inverse(F.pad(out, padding), t)
        assert back.shape == x.shape and torch.equal(back, back_padded[origin])
        assert relative_error(back_padded[far_end], back) > 0.1


def test_bad_inputs_are_named():
    model = make_idm()
    with pytest.raises(ValueError, match=r"expects shape \(B, 2, S, S, S\), got \(1, 3, 16, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="one entry per sample"):
        model(torch.randn(2, 2, 16, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 2, 16, 16, 16), torch.tensor([1]), context=torch.randn(1, 4))


def test_flags_must_be_bools_and_the_trunk_factories_pass_through():
    """Command-line strings are the configs' to convert: the network refuses them by name. ``block`` and
    ``attention`` reach the trunk, whose blocks are conditioned on the time embedding."""
    tiny = {"channels": (8, 16), "num_blocks": 1}
    with pytest.raises(TypeError, match=r"^memory_efficient must be a bool .*got 'false' .*configs convert"):
        InvertibleDiffusionUNet(2, 1, 1, attention_levels=(False, False), memory_efficient="false", **tiny)
    with pytest.raises(TypeError, match=r"^attention_levels must be a sequence of bools"):
        InvertibleDiffusionUNet(2, 1, 1, attention_levels=("false", "true"), **tiny)
    with pytest.raises(TypeError, match=r"^recompute_norms must be a bool"):
        InvertibleDiffusionUNet(2, 1, 1, recompute_norms="false", **tiny)
    model = InvertibleDiffusionUNet(2, 1, 1, attention_levels=(False, False), **tiny)
    with pytest.raises(TypeError, match=r"^memory_efficient must be a bool"):
        model.memory_efficient = "false"
    built = []

    def block(spatial_dims, channels, cond_dim):
        built.append((spatial_dims, channels, cond_dim))
        return CouplingBlock(channel_mixing=False)(spatial_dims, channels, cond_dim)

    model = InvertibleDiffusionUNet(
        2,
        1,
        1,
        attention_levels=(False, True),
        time_embed_dim=12,
        block=block,
        attention=AttentionPair(num_heads=2),
        **tiny,
    )
    assert sorted(set(built)) == [(2, 8, 12), (2, 16, 12)] and len(built) == 3
    assert not any(isinstance(m, OrthogonalChannelMixing) for m in model.modules())
    heads = [m.num_heads for m in model.modules() if isinstance(m, InvertibleAttention)]
    assert heads == [2, 2]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 8, 8), torch.tensor([3])).shape == (1, 1, 8, 8)


def test_memory_efficient_switch_reaches_the_trunk_and_gradients_agree(device):
    model = make_idm().to(device)
    x, t = torch.randn(2, 2, 16, 16, 16).to(device), torch.tensor([3, 70]).to(device)
    weight = torch.randn(2, 2, 16, 16, 16).to(device)
    results = {}
    for flag in (True, False):
        model.memory_efficient = flag
        assert model.trunk.memory_efficient is flag
        xi = x.clone().requires_grad_(True)
        loss = (model(xi, t) * weight).sum()
        results[flag] = torch.autograd.grad(loss, [xi, *model.parameters()])
    names = ["input"] + [n for n, _ in model.named_parameters()]
    assert any(n.startswith("time_mlp") for n in names)
    for name, g_me, g_plain in zip(names, results[True], results[False], strict=True):
        assert g_plain.norm() > 0, name  # the time MLP gets its gradient through the engine
        assert relative_error(g_me, g_plain) <= 1e-5, name


def test_approximate_inverse_is_differentiable_and_memory_efficient():
    model = make_idm()
    x = torch.randn(1, 2, 16, 16, 16)
    t = torch.tensor([10])
    stored = saved_activation_bytes(lambda: (model.inverse(model(x, t), t) - x).square().mean(), model)
    model.memory_efficient = False
    stored_plain = saved_activation_bytes(lambda: (model.inverse(model(x, t), t) - x).square().mean(), model)
    assert stored < 0.2 * stored_plain
    model.memory_efficient = True
    loss = (model.inverse(model(x, t), t) - x).square().mean()
    loss.backward()
    assert model.stem.weight.grad.norm() > 0 and model.head.weight.grad.norm() > 0


def _stored_bytes(model, size=32):
    torch.manual_seed(1)
    x, t = torch.randn(1, 2, size, size, size), torch.tensor([500])
    return saved_activation_bytes(lambda: model(x, t).square().mean(), model)


def test_stored_bytes_flat_in_depth_and_far_below_monai_diffusion_unet():
    config = {"channels": (16, 32, 64, 128), "attention_levels": (False, False, True, True)}
    stored = {}
    for num_blocks in (1, 8):
        model = InvertibleDiffusionUNet(3, 2, 2, num_blocks=num_blocks, **config)
        stored[num_blocks] = _stored_bytes(model)
        baseline, kwargs = matched_monai_unet(count_parameters(model), 3, 2, 2, config["attention_levels"])
        assert abs(count_parameters(baseline) / count_parameters(model) - 1) <= 0.1
        assert stored[num_blocks] <= 0.15 * _stored_bytes(baseline), kwargs
        model.memory_efficient = False
        assert stored[num_blocks] <= 0.15 * _stored_bytes(model)
    assert stored[8] <= 1.05 * stored[1]


def test_paper_configuration_builds_on_the_meta_device():
    with torch.device("meta"):
        model = InvertibleDiffusionUNet()
    assert model.trunk.channels == (64, 128, 256, 512, 1024, 2048)
    assert model.trunk.attention_levels == (False, False, False, False, True, True)
    assert 300e6 < count_parameters(model) < 500e6


def test_checkpointed_monai_baseline_matches_plain_autograd_and_stores_less():
    from scripts.benchmarking import CheckpointedBlock, enable_activation_checkpointing

    torch.manual_seed(0)
    plain, _ = matched_monai_unet(400_000, 3, 2, 2, (False, True, True))
    checkpointed = enable_activation_checkpointing(copy.deepcopy(plain))
    assert any(isinstance(m, CheckpointedBlock) for m in checkpointed.modules())
    x, t = torch.randn(1, 2, 16, 16, 16), torch.tensor([40])
    grads = [torch.autograd.grad(m(x, t).square().mean(), list(m.parameters())) for m in (plain, checkpointed)]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    assert _stored(checkpointed, x, t) < 0.5 * _stored(plain, x, t)


def _stored(model, x, t):
    return saved_activation_bytes(lambda: model(x, t).square().mean(), model)


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_back_propagate_the_whole_batch_gradient(micro_batch_size):
    """Gradient accumulation over micro-batches (1+1+1+1, and the uneven 3+1) gives the gradient, loss and
    Eq. 8 terms of the whole batch at once, the λ_R (inverse) and λ_L2 terms included."""
    model = make_idm().double()
    generator = torch.Generator().manual_seed(4)
    noisy, noise = (torch.randn(4, 2, 16, 16, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    timesteps = torch.randint(0, 100, (4,), generator=generator)
    results = {}
    for size in (None, micro_batch_size):
        model.zero_grad(set_to_none=True)
        prediction, loss, terms = idm_loss_backward(model, noisy, timesteps, noise, 0.5, 1e-2, size)
        results[size] = (prediction, loss, terms, [p.grad.clone() for p in model.parameters()])
    (p_whole, l_whole, t_whole, g_whole), (p_micro, l_micro, t_micro, g_micro) = results.values()
    assert not p_micro.requires_grad and p_micro.shape == noisy.shape and relative_error(p_micro, p_whole) < 1e-12
    assert relative_error(l_micro, l_whole) < 1e-12
    assert t_micro.keys() == t_whole.keys() == {"prediction_mse", "reconstruction", "weight_norm"}
    assert all(relative_error(t_micro[k], t_whole[k]) < 1e-12 for k in t_whole)
    for (name, _), a, b in zip(model.named_parameters(), g_micro, g_whole, strict=True):
        assert b.norm() > 0 and relative_error(a, b) < 1e-10, name


@pytest.mark.parametrize(
    "spatial_dims, shape, micro_batch_size, dtype, tolerance",
    [
        pytest.param(3, (12, 10, 14), None, torch.float64, 1e-11, id="3d-12x10x14-whole_batch"),
        pytest.param(2, (13, 18), None, torch.float64, 1e-11, id="2d-13x18-whole_batch"),
        pytest.param(3, (12, 10, 14), 1, torch.float64, 1e-11, id="3d-12x10x14-micro_batches_of_1"),
        pytest.param(2, (13, 18), 1, torch.float64, 1e-11, id="2d-13x18-micro_batches_of_1"),
        # float32 at batch 1 on the CPU: the convolutions take their oneDNN split path (SameConv3d)
        pytest.param(3, (12, 10, 14), 1, torch.float32, 1e-4, id="3d-12x10x14-micro_batches_of_1-float32"),
    ],
)
def test_memory_efficient_loss_backward_matches_plain_autograd_at_padded_sizes(
    spatial_dims, shape, micro_batch_size, dtype, tolerance, device, one_torch_thread
):
    """idm_loss_backward (Eq. 8 with λ_R > 0, so the approximate inverse U⁻¹ is back-propagated too, and
    λ_L2 > 0) on a size the model pads and crops: the memory-efficient model, on the whole batch or in
    micro-batches of one sample, against its plain-autograd twin on the whole batch: predictions, loss, terms
    and every parameter's gradient agree to 1e-11 in float64 (1e-4 in float32)."""
    if dtype == torch.float32 and device.type != "cpu":
        pytest.skip("the float32 case is there for the CPU's batch-1 convolution path")
    model = make_idm(spatial_dims=spatial_dims, num_blocks=1).to(device, dtype)
    generator = torch.Generator().manual_seed(7)
    noisy, noise = (torch.randn(3, 2, *shape, generator=generator, dtype=dtype).to(device) for _ in range(2))
    timesteps = torch.tensor([3, 50, 90]).to(device)
    results = {}
    for memory_efficient in (True, False):
        model.memory_efficient = memory_efficient
        model.zero_grad(set_to_none=True)
        size = micro_batch_size if memory_efficient else None
        prediction, loss, terms = idm_loss_backward(model, noisy, timesteps, noise, 0.5, 1e-2, size)
        results[memory_efficient] = (prediction, loss, terms, [p.grad.clone() for p in model.parameters()])
    (p_me, l_me, t_me, g_me), (p_plain, l_plain, t_plain, g_plain) = results[True], results[False]
    assert p_me.shape == noisy.shape and relative_error(p_me, p_plain) < tolerance
    assert relative_error(l_me, l_plain) < tolerance
    assert t_me.keys() == t_plain.keys() == {"prediction_mse", "reconstruction", "weight_norm"}
    assert all(relative_error(t_me[k], t_plain[k]) < tolerance for k in t_plain)
    for (name, _), a, b in zip(model.named_parameters(), g_me, g_plain, strict=True):
        assert b.norm() > 0 and relative_error(a, b) < tolerance, name


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_batch_and_micro_batch_sizes_are_named(bad):
    with pytest.raises(ValueError, match=r"micro_batch_size must be a positive integer .* or null"):
        micro_batches(4, bad)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer \(samples per training step\)"):
        micro_batches(bad, None)
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(5, None) == [slice(0, 5)]
