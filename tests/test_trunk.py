"""The invertible U-Net trunk and the memory-saving engine against plain autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import redraw_zero_init_, relative_error
from torch.func import functional_call

from bundle.networks import (
    AdditiveCoupling,
    AttentionPair,
    CouplingBlock,
    CouplingFunction,
    CouplingLayer,
    InvertibleAttention,
    InvertibleModule,
    InvertibleUNet,
    OrthogonalChannelMixing,
    OrthogonalDownsampling,
    SkipSplit,
    skip_channels,
)
from scripts.benchmarking import saved_activation_bytes

CHANNELS = (8, 16, 32, 64)  # 4 levels in 3D
ATTENTION = (False, False, True, True)  # the deepest two


def make_trunk(dtype=torch.float32, memory_efficient=True, **kwargs) -> InvertibleUNet:
    torch.manual_seed(0)
    trunk = InvertibleUNet(
        3, CHANNELS, num_blocks=2, attention_levels=ATTENTION, cond_dim=6, memory_efficient=memory_efficient, **kwargs
    )
    return redraw_zero_init_(trunk).to(dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_round_trip(dtype, tolerance, device):
    trunk = make_trunk(dtype).to(device)
    x = torch.randn(2, CHANNELS[0], 16, 16, 16, dtype=dtype).to(device)
    cond = torch.randn(2, 6, dtype=dtype).to(device)
    with torch.no_grad():
        y = trunk(x, cond)
        assert y.shape == x.shape
        assert relative_error(y, x) > 0.1  # far from the identity initialisation
        assert relative_error(trunk.inverse(y, cond), x) <= tolerance
        assert relative_error(trunk(trunk.inverse(x, cond), cond), x) <= tolerance


def _gradients(trunk, x, cond, weight):
    x, cond = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    out = trunk(x, cond)
    return out, torch.autograd.grad((out * weight).sum(), [x, cond, *trunk.parameters()])


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_memory_efficient_gradients_match_plain_autograd(direction, device):
    trunk = make_trunk().to(device)
    if direction == "inverse":
        trunk.forward, trunk.inverse = trunk.inverse, trunk.forward  # instance attributes only
    x = torch.randn(2, CHANNELS[0], 16, 16, 16).to(device)
    cond, weight = torch.randn(2, 6).to(device), torch.randn_like(x)
    trunk.memory_efficient = True
    out_me, grads_me = _gradients(trunk, x, cond, weight)
    trunk.memory_efficient = False
    out_plain, grads_plain = _gradients(trunk, x, cond, weight)
    assert torch.equal(out_me, out_plain)
    names = ["input", "cond"] + [n for n, _ in trunk.named_parameters()]
    for name, g_me, g_plain in zip(names, grads_me, grads_plain, strict=True):
        assert g_plain.norm() > 0, name
        assert relative_error(g_me, g_plain) <= 1e-5, name
    for kind in ("generator", "query", "key", ".out.", "cond_proj", "conv2"):  # every kind of parameter
        assert any(kind in name for name in names), kind


def test_tiny_trunk_gradcheck_float64(one_torch_thread):
    torch.manual_seed(0)
    trunk = redraw_zero_init_(InvertibleUNet(3, (4, 16), 1, (True, True), cond_dim=2), std=0.3).double()
    x = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    assert trunk.memory_efficient
    assert torch.autograd.gradcheck(trunk, (x, cond), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(trunk.inverse, (x, cond), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.fixture
def one_sample_chunks(monkeypatch) -> list[int]:
    """Sets ``CouplingLayer.chunk_elements`` (the class attribute) to 1, so that every coupling and attention
    sends its batch through the conditioner one sample at a time, and returns the list to which the number
    of samples of each chunk is appended (chunks of the no-grad forward/inverse and of the reverse step)."""
    monkeypatch.setattr(CouplingLayer, "chunk_elements", 1)
    rows: list[int] = []
    apply_in_chunks, reverse_chunk = CouplingLayer._apply_in_chunks, CouplingLayer._reverse_chunk_

    def recording_apply(self, x, cond, combine):
        if torch.is_grad_enabled():  # under autograd the batch goes through whole
            return apply_in_chunks(self, x, cond, combine)
        return apply_in_chunks(self, x, cond, lambda part, h: rows.append(part.shape[0]) or combine(part, h))

    def recording_reverse(self, y, *args):
        rows.append(y.shape[0])
        return reverse_chunk(self, y, *args)

    monkeypatch.setattr(CouplingLayer, "_apply_in_chunks", recording_apply)
    monkeypatch.setattr(CouplingLayer, "_reverse_chunk_", recording_reverse)
    return rows


# the smallest trunks with every kind of step: channel mixing, couplings with a condition, attention on the
# skip and at the bottom, learned down- and upsampling, split and merge
TINY_TRUNKS = {2: ((4, 8), (4, 8)), 3: ((4, 16), (4, 4, 4))}  # spatial_dims: (channels, spatial size)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_memory_efficient_trunk_gradcheck_float64_with_parameters_in_one_sample_chunks(
    spatial_dims, direction, one_sample_chunks, one_torch_thread
):
    """float64 gradcheck of the memory-efficient trunk (forward, and inverse as a function) with respect to
    the input, the per-sample condition and every parameter, at batch 2 with the couplings' and attentions'
    batches cut into chunks of one sample. Fast mode (a random projection per input tensor): a full
    Jacobian over thousands of parameters would take minutes; test_tiny_trunk_gradcheck_float64 checks the
    full Jacobian of the input and the condition."""
    torch.manual_seed(0)
    channels, size = TINY_TRUNKS[spatial_dims]
    trunk = redraw_zero_init_(InvertibleUNet(spatial_dims, channels, 1, (True, True), cond_dim=2), std=0.3).double()
    assert trunk.memory_efficient
    kinds = {type(m) for m in trunk.modules()}
    assert {OrthogonalChannelMixing, CouplingFunction, InvertibleAttention, OrthogonalDownsampling} <= kinds
    if direction == "inverse":
        trunk.forward, trunk.inverse = trunk.inverse, trunk.forward  # instance attributes only
    names = [n for n, _ in trunk.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in trunk.parameters()]
    x = torch.randn(2, channels[0], *size, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def trunk_of(x, cond, *values):
        return functional_call(trunk, dict(zip(names, values, strict=True)), (x, cond), strict=True)

    assert torch.autograd.gradcheck(trunk_of, (x, cond, *params), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)
    assert one_sample_chunks and set(one_sample_chunks) == {1}
    if direction == "forward":  # the engine's coupling reverse step ran (chunked) as well as the no-grad passes
        assert len(one_sample_chunks) > 2 * sum(isinstance(m, CouplingLayer) for m in trunk.modules())


# trunk options that test_memory_efficient_gradients_match_plain_autograd leaves at their defaults: (spatial
# dims, InvertibleUNet keywords, batch, spatial size); sizes are not cubes, so that swapped axes show
TWIN_OPTIONS = {
    "2d": (2, {}, 2, (16, 24)),
    "no_channel_mixing": (3, {"channel_mixing": False}, 2, (8, 16, 8)),
    "recompute_norms": (3, {"recompute_norms": True}, 2, (8, 16, 8)),
    "two_heads": (3, {"num_heads": 2}, 2, (8, 16, 8)),
    "one_sample_chunks": (3, {}, 3, (8, 16, 8)),
}


@pytest.mark.parametrize("option", TWIN_OPTIONS)
def test_memory_efficient_trunk_matches_plain_autograd_in_float64_for_each_option(
    option, device, one_torch_thread, request
):
    """The memory-efficient trunk against its plain-autograd twin (the same modules, memory_efficient=False),
    in float64: the output and the gradients of the input, the condition and every parameter, within 1e-12
    relative error, for a 2D trunk, a trunk without channel mixing, with recomputed norms, with two attention
    heads, and with a batch of 3 whose couplings and attentions take one sample per chunk."""
    spatial_dims, options, batch, size = TWIN_OPTIONS[option]
    rows = request.getfixturevalue("one_sample_chunks") if option == "one_sample_chunks" else None
    torch.manual_seed(0)
    trunk = InvertibleUNet(spatial_dims, (8, 16, 32), 1, (False, True, True), cond_dim=3, **options)
    trunk = redraw_zero_init_(trunk, std=0.1).double().to(device)
    modules = list(trunk.modules())
    if option == "no_channel_mixing":
        assert not any(isinstance(m, OrthogonalChannelMixing) for m in modules)
    if option == "recompute_norms":
        assert all(m.recompute_norms for m in modules if isinstance(m, CouplingFunction))
    if option == "two_heads":
        assert all(m.num_heads == 2 for m in modules if isinstance(m, InvertibleAttention))
    x = torch.randn(batch, 8, *size, dtype=torch.float64).to(device)
    cond = torch.randn(batch, 3, dtype=torch.float64).to(device)
    weight = torch.randn_like(x)
    trunk.memory_efficient = True
    out_me, grads_me = _gradients(trunk, x, cond, weight)
    trunk.memory_efficient = False
    out_plain, grads_plain = _gradients(trunk, x, cond, weight)
    assert relative_error(out_plain, x) > 0.1  # far from the identity initialisation
    assert relative_error(out_me, out_plain) <= 1e-13
    names = ["input", "cond"] + [n for n, _ in trunk.named_parameters()]
    for name, g_me, g_plain in zip(names, grads_me, grads_plain, strict=True):
        assert g_plain.norm() > 0, name
        assert relative_error(g_me, g_plain) <= 1e-12, name
    if rows is not None:
        assert rows and set(rows) == {1}  # the forward pass and the reverse steps went sample by sample


def _count_reconstructions(trunk, monkeypatch) -> dict[str, int]:
    """Counts calls of every step's ``inverse`` and ``reverse`` (the engine's reconstruction)."""
    calls = {"inverse": 0, "reverse": 0}
    for step in trunk.sequence.steps:
        for method in calls:
            original = getattr(step, method)

            def counting(*args, _original=original, _method=method):
                calls[_method] += 1
                return _original(*args)

            monkeypatch.setattr(step, method, counting)
    return calls


def test_no_grad_stores_nothing_and_recomputes_nothing(monkeypatch):
    trunk = make_trunk()
    calls = _count_reconstructions(trunk, monkeypatch)
    x, cond = torch.randn(1, CHANNELS[0], 16, 16, 16), torch.randn(1, 6)
    with torch.no_grad():
        assert saved_activation_bytes(lambda: trunk(x, cond), trunk) == 0
    assert calls == {"inverse": 0, "reverse": 0}


def test_backward_reconstructs_each_step_once_and_stores_only_the_output(monkeypatch):
    trunk = make_trunk()
    calls = _count_reconstructions(trunk, monkeypatch)
    x, cond = torch.randn(1, CHANNELS[0], 16, 16, 16), torch.randn(1, 6, requires_grad=True)
    out = trunk(x, cond)
    assert calls == {"inverse": 0, "reverse": 0}  # the forward pass reconstructs nothing
    stored = saved_activation_bytes(lambda: trunk(x, cond), trunk)
    assert stored == out.numel() * 4 + cond.numel() * 4  # the output state and the condition
    out.sum().backward()
    # every step is reversed once; the split/merge steps' reverse is their inverse applied to the state and
    # to its gradient (data movement), the other steps' reverse does not call their inverse
    splits = sum(isinstance(step, SkipSplit) for step in trunk.sequence.steps)
    assert splits > 0
    assert calls == {"inverse": 2 * splits, "reverse": len(trunk.sequence.steps)}


def test_invalid_schedules_name_a_valid_one():
    for bad in [(16, 30), (6, 56), (8, 64), (7, 16), (8, 16, 36)]:
        with pytest.raises(ValueError, match=r"A valid schedule: channels=\(") as info:
            skip_channels(3, bad)
        suggested = eval(str(info.value).split("channels=")[-1].rstrip("."))
        assert len(suggested) == len(bad)
        skip_channels(3, suggested)  # the suggestion is valid
    assert skip_channels(3, (64, 128, 256)) == (48, 96)
    assert skip_channels(2, (8, 16)) == (4,)


def test_sizes_that_do_not_fit_are_rejected_with_sizes_that_work():
    trunk = make_trunk()
    with pytest.raises(ValueError, match=r"not divisible by 16 .*e\.g\. \(16, 16, 32\)"):
        trunk(torch.randn(1, CHANNELS[0], 16, 16, 24), torch.randn(1, 6))
    with pytest.raises(ValueError, match="attention_levels has 2 entries"):
        InvertibleUNet(3, CHANNELS, attention_levels=(True, True))


def test_two_dimensional_trunk_from_the_same_classes():
    torch.manual_seed(0)
    trunk = redraw_zero_init_(InvertibleUNet(2, (8, 16, 32), 1, (False, True, True), cond_dim=4))
    x, cond = torch.randn(2, 8, 16, 16), torch.randn(2, 4)
    with torch.no_grad():
        assert relative_error(trunk.inverse(trunk(x, cond), cond), x) <= 1e-5


def test_flags_must_be_bools_and_strings_are_refused_by_name():
    """The trunk takes bools only: a command line's "false" is the configs' to convert, and is refused here
    with the argument, the value and what is accepted (it would otherwise be truthy)."""
    for name, bad in (("memory_efficient", "false"), ("channel_mixing", "true"), ("recompute_norms", 0)):
        with pytest.raises(TypeError, match=f"^{name} must be a bool \\(True or False\\), got {bad!r}"):
            InvertibleUNet(3, (8, 16, 32), 1, **{name: bad})
    with pytest.raises(TypeError, match=r"got 'false' \(a str\)\. The bundle's configs convert command-line strings"):
        InvertibleUNet(3, (8, 16, 32), 1, memory_efficient="false")
    with pytest.raises(
        TypeError,
        match=r"attention_levels must be a sequence of bools, one per level \(e\.g\. "
        r"\(False, True, True\)\), got \['false', 'True', 'true'\]\..*configs convert",
    ):
        InvertibleUNet(3, (8, 16, 32), 1, ["false", "True", "true"])
    for bad in (True, "true", (0, 1, 1)):
        with pytest.raises(TypeError, match="attention_levels must be a sequence of bools"):
            InvertibleUNet(3, (8, 16, 32), 1, bad)
    trunk = InvertibleUNet(3, (8, 16, 32), 1, [False, True, True])
    assert trunk.attention_levels == (False, True, True)
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        trunk.memory_efficient = "false"
    assert trunk.memory_efficient is True
    with pytest.raises(TypeError, match="channel_mixing must be a bool"):
        CouplingBlock(channel_mixing="false")


class ChannelAffine(InvertibleModule):
    """A layer that InvertibleUNet does not know: ``y = x·exp(a) + b(cond)`` per channel, with a learned log-scale
    ``a`` (C,) and a shift that a linear map gives from the condition (B, E)."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.zeros(channels))
        self.shift = torch.nn.Linear(cond_dim, channels)

    def _scale_shift(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1) + (1,) * (x.ndim - 2)
        return self.log_scale.exp().reshape(view), self.shift(cond).reshape(cond.shape[0], *view[1:])

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = self._scale_shift(x, cond)
        return x * scale + shift

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = self._scale_shift(y, cond)
        return (y - shift) / scale


def affine_coupling_block(spatial_dims: int, channels: int, cond_dim: int | None) -> list[InvertibleModule]:
    """A block of one's own: the new layer, then a coupling without channel mixing."""
    return [ChannelAffine(channels, cond_dim), AdditiveCoupling(spatial_dims, channels, cond_dim)]


def one_parity_attention(spatial_dims: int, channels: int, cond_dim: int | None) -> list[InvertibleModule]:
    return [InvertibleAttention(spatial_dims, channels, parity=1)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_block_and_an_attention_of_ones_own_plug_in_through_the_factories(spatial_dims, one_torch_thread):
    """A new invertible layer (with the generic reverse step) and a one-parity attention, given to an unchanged
    InvertibleUNet as ``block`` and ``attention``: exact round trip, and the memory-efficient engine's output and
    gradients (input, condition, every parameter) equal plain autograd's to 1e-12 in float64."""
    torch.manual_seed(0)
    channels, size = TINY_TRUNKS[spatial_dims]
    trunk = InvertibleUNet(
        spatial_dims, channels, 2, (True, True), cond_dim=3, block=affine_coupling_block, attention=one_parity_attention
    )
    trunk = redraw_zero_init_(trunk, std=0.1).double()
    layers = [type(getattr(step, "layer", step)) for step in trunk.sequence.steps]
    assert layers.count(ChannelAffine) == 2 * (2 * len(channels) - 1)  # 2 blocks per encoder and decoder level
    assert OrthogonalChannelMixing not in layers and layers.count(InvertibleAttention) == 2  # skip and bottom
    x = torch.randn(2, channels[0], *size, dtype=torch.float64)
    cond, weight = torch.randn(2, 3, dtype=torch.float64), torch.randn_like(x)
    with torch.no_grad():
        y = trunk(x, cond)
        assert relative_error(y, x) > 0.1
        assert relative_error(trunk.inverse(y, cond), x) <= 1e-12
    out_me, grads_me = _gradients(trunk, x, cond, weight)
    trunk.memory_efficient = False
    out_plain, grads_plain = _gradients(trunk, x, cond, weight)
    assert relative_error(out_me, out_plain) <= 1e-13
    names = ["input", "cond"] + [n for n, _ in trunk.named_parameters()]
    assert any("log_scale" in n for n in names) and any(".shift." in n for n in names)
    for name, g_me, g_plain in zip(names, grads_me, grads_plain, strict=True):
        assert g_plain.norm() > 0, name
        assert relative_error(g_me, g_plain) <= 1e-12, name


def test_the_default_factories_are_the_blocks_and_attention_of_the_trunks_options():
    """``block=CouplingBlock(...)``, ``attention=AttentionPair(...)`` build the very trunk (same state_dict keys and
    initial weights) as the options they replace; those options are refused beside a factory of one's own, and
    a factory must return invertible modules."""

    def build(**kwargs):
        torch.manual_seed(0)
        return InvertibleUNet(3, (8, 16, 32), 2, (False, True, True), cond_dim=4, **kwargs).state_dict()

    by_options = build(channel_mixing=False, recompute_norms=True, num_heads=2)
    by_factories = build(block=CouplingBlock(channel_mixing=False, recompute_norms=True), attention=AttentionPair(2))
    assert list(by_options) == list(by_factories)
    assert all(torch.equal(by_options[k], by_factories[k]) for k in by_options)
    assert "sequence.steps.0.layer.generator" in build() and "sequence.steps.1.layer.function.conv1.weight" in build()
    with pytest.raises(
        ValueError, match=r"set them in the block instead, e\.g\. block=CouplingBlock\(channel_mixing=False"
    ):
        InvertibleUNet(3, (8, 16, 32), 1, channel_mixing=False, block=affine_coupling_block)
    with pytest.raises(ValueError, match=r"e\.g\. attention=AttentionPair\(num_heads=2\)"):
        InvertibleUNet(3, (8, 16, 32), 1, num_heads=2, attention=one_parity_attention)
    with pytest.raises(TypeError, match="block must be a LayerFactory"):
        InvertibleUNet(3, (8, 16, 32), 1, block="coupling")
    for bad in (lambda d, c, e: AdditiveCoupling(d, c, e), lambda d, c, e: [torch.nn.Identity()]):
        with pytest.raises(TypeError, match="must return a sequence of InvertibleModule layers"):
            InvertibleUNet(3, (8, 16, 32), 1, block=bad)


def test_backward_leaves_the_output_and_the_gradients_it_was_given_intact():
    """Steps overwrite the states and gradients that the engine owns, never the output state (the caller
    holds it) or the output gradient it is given (a hook on the output sees the very tensor the engine
    receives); a retained graph back-propagates twice to the same gradients."""
    trunk = make_trunk()
    x = torch.randn(2, CHANNELS[0], 16, 16, 16, requires_grad=True)
    cond, weight = torch.randn(2, 6), torch.randn(2, CHANNELS[0], 16, 16, 16)
    out = trunk(x, cond)
    out_before = out.detach().clone()
    received = []
    out.register_hook(lambda grad: received.append((grad, grad.clone())))
    loss = (out * weight).sum()
    loss.backward(retain_graph=True)
    assert torch.equal(out, out_before)
    ((given, given_before),) = received
    assert torch.equal(given_before, weight) and torch.equal(given, given_before)
    first = [x.grad.clone()] + [p.grad.clone() for p in trunk.parameters()]
    x.grad = None
    trunk.zero_grad(set_to_none=True)
    loss.backward()
    for g_first, g_second in zip(first, [x.grad] + [p.grad for p in trunk.parameters()], strict=True):
        assert torch.equal(g_first, g_second)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_handed_over_output_takes_the_expanded_gradient_of_a_reduction(reduction):
    """``.sum()`` and ``.mean()`` hand down a stride-0 gradient, which cannot be overwritten in place."""
    trunk = make_trunk()
    x, cond = torch.randn(2, CHANNELS[0], 16, 16, 16), torch.randn(2, 6)
    grads = []
    for hand_over in (False, True):
        x_leaf = x.clone().requires_grad_(True)
        getattr(trunk(x_leaf, cond, hand_over_output=hand_over), reduction)().backward()
        grads.append(x_leaf.grad)
    assert grads[0].norm() > 0 and torch.equal(grads[0], grads[1])


def test_handed_over_output_gives_the_same_gradients_and_refuses_a_second_backward():
    trunk = make_trunk()
    x, weight = torch.randn(2, CHANNELS[0], 16, 16, 16), torch.randn(2, CHANNELS[0], 16, 16, 16)
    cond = torch.randn(2, 6)
    _, expected = _gradients(trunk, x, cond, weight)
    x_leaf, cond_leaf = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    loss = (trunk(x_leaf, cond_leaf, hand_over_output=True) * weight).sum()
    grads = torch.autograd.grad(loss, [x_leaf, cond_leaf, *trunk.parameters()], retain_graph=True)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    with pytest.raises(RuntimeError, match=r"hand_over_output=True.*cannot be back-propagated twice"):
        loss.backward()
