"""The samplers against the exact answer: for Gaussian data the noise predictor and the probability-flow ODE's
solution are closed-form, so a deterministic sampler's error is measurable, and it must fall with the order its
method promises."""

from __future__ import annotations

import pytest
import torch

from bundle.diffusion import DPMSolverScheduler, GridDDIMScheduler

T = 1000
MEAN, STD = 0.2, 0.3  # the data: x₀ ~ N(MEAN, STD²) per voxel


def _exact_eps(x: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """E[ε | x_t] for Gaussian data: x_t ~ N(α MEAN, α² STD² + σ²), so ε̂ = σ (x_t − α MEAN) / (α² STD² + σ²)."""
    a = alpha_cumprod.double()
    return (1 - a).sqrt() * (x - a.sqrt() * MEAN) / (a * STD**2 + 1 - a)


def _error(scheduler_class: type, steps: int, schedule: str) -> float:
    """The largest error of the sampler's x₀ over 1000 chains against the ODE's exact x₀, the data quantile of the
    start's quantile: x₀ = MEAN + STD z with z = (x_T − α_T MEAN) / √(α_T² STD² + σ_T²)."""
    scheduler = scheduler_class(num_train_timesteps=T, schedule=schedule, clip_sample=False)
    scheduler.set_timesteps(steps)
    start = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = start.clone()
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(_exact_eps(x, scheduler.alphas_cumprod[t]), t, x)[0]
    a = scheduler.alphas_cumprod[scheduler.timesteps[0]].double()
    z = (start - a.sqrt() * MEAN) / (a * STD**2 + 1 - a).sqrt()
    return (x - (MEAN + STD * z)).abs().max().item()


@pytest.mark.parametrize("schedule", ["scaled_linear_beta", "cosine"])
def test_dpm_solver_is_second_order_and_ddim_first(schedule):
    """From 5 to 20 steps DDIM's error falls about 4× (first order), DPM-Solver++(2M)'s by more than 8× (second
    order, its last step to x₀ a first-order one), and at 20 steps it is several times below DDIM's."""
    ddim = {n: _error(GridDDIMScheduler, n, schedule) for n in (5, 10, 20)}
    dpm = {n: _error(DPMSolverScheduler, n, schedule) for n in (5, 10, 20)}
    assert 3 < ddim[5] / ddim[20] < 5.5, ddim
    assert dpm[5] > dpm[10] > dpm[20] and dpm[5] / dpm[20] > 8, dpm
    assert dpm[20] < ddim[20] / 4, (dpm, ddim)


def test_dpm_solver_forgets_the_previous_chain():
    """set_timesteps starts a new chain: a second chain from the same start gives the same result (a kept estimate
    of the first chain's last step would be extrapolated into the second's first)."""
    scheduler = DPMSolverScheduler(num_train_timesteps=T, schedule="cosine", clip_sample=False)
    start = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for _ in range(2):
        scheduler.set_timesteps(6)
        x = start.clone()
        for t in scheduler.timesteps.tolist():
            x = scheduler.step(_exact_eps(x, scheduler.alphas_cumprod[t]), t, x)[0]
        results.append(x)
    assert torch.equal(*results)
    assert len(scheduler.timesteps) == 6 and scheduler.timesteps[0] == T - 1 and scheduler.timesteps[-1] == 0


def _inversion_errors(steps: int) -> tuple[float, float]:
    """DDIM inversion of 1000 Gaussian data points with the exact ε̂: the largest error of the noise it reaches
    against the ODE's exact x_T (the start's quantile), and of the round trip (sampling back from it) against the
    data."""
    scheduler = GridDDIMScheduler(num_train_timesteps=T, schedule="cosine", clip_sample=False)
    scheduler.set_timesteps(steps)
    z = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    data = MEAN + STD * z
    x = data.clone()
    for t in reversed(scheduler.timesteps.tolist()):
        x = scheduler.invert_step(_exact_eps(x, scheduler.alphas_cumprod[t]), t, x)
    a = scheduler.alphas_cumprod[scheduler.timesteps[0]].double()
    noise_error = (x - (a.sqrt() * MEAN + (a * STD**2 + 1 - a).sqrt() * z)).abs().max().item()
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(_exact_eps(x, scheduler.alphas_cumprod[t]), t, x)[0]
    return noise_error, (x - data).abs().max().item()


def test_ddim_inversion_reaches_the_exact_noise_and_back_to_first_order():
    """Run backwards, DDIM reaches the probability-flow ODE's x_T, and sampling from it returns the data, both with
    an error that falls about as the steps grow (first order)."""
    errors = {n: _inversion_errors(n) for n in (5, 20, 80)}
    for which in (0, 1):
        assert errors[5][which] > 2.5 * errors[20][which] > 2.5**2 * errors[80][which], errors
    assert errors[80][1] < 0.06, errors  # the worst of 1000 points, in units of the data (its spread: 0.3)


def test_inversion_refuses_a_chain_that_draws_noise():
    from bundle.diffusion import invert
    from bundle.errors import BadInputError

    with pytest.raises(BadInputError, match="--sampler ddim with --eta 0"):
        invert(torch.nn.Identity(), GridDDIMScheduler(num_train_timesteps=T, eta=1.0), torch.zeros(1, 1, 4, 4, 4))
