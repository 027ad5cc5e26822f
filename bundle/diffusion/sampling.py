"""Sampling: a MONAI ``Inferer`` that turns noise into images with any MONAI noise scheduler's chain, DDIM that
steps along its own grid, DPM-Solver++(2M), a second-order solver of the probability-flow ODE on that grid, and Euler's
method along a rectified flow model's velocity."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, RFlowScheduler, Scheduler
from torch import nn
from tqdm import tqdm

from ..errors import BadInputError
from ..utils import evaluating
from .maths import (
    predict_start_from_noise,
    predict_start_from_velocity,
    to_image_range,
    to_model_range,
    with_condition,
)
from .noise import seeded_generator
from .objectives import OBJECTIVES, noise_schedule

__all__ = [
    "DEFAULT_SAMPLERS",
    "SAMPLERS",
    "DPMSolverScheduler",
    "DiffusionSampler",
    "FlowEulerScheduler",
    "GridDDIMScheduler",
    "deterministic_chain",
    "invert",
    "make_sampler",
    "monitoring_sampler",
    "sample_from",
]


class GridDDIMScheduler(DDIMScheduler):
    """MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` whose :meth:`step` from t goes to the next timestep
    of its own ``timesteps``, so that the network is always evaluated at the noise level the sample has, and whose
    noise term agrees with the clipped x̂₀.

    MONAI's step goes from t to t − ⌊T / n⌋, while ``set_timesteps`` spaces the n timesteps (T − 1) / (n − 1) apart:
    with T = 2000 and n = 5 every step goes 400 steps down and the next treats the sample as if it were 100 steps
    less noisy (x̂₀ and ε̂ are then formed at the wrong ᾱ). Here the step is DDIM's Eq. 12 (Song et al., 2021) from
    t to the next timestep t′ of ``timesteps`` (or to x₀ after the last), with σ_t(η) of Eq. 16:

        x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t   (clamped to ``clip_sample_values`` when ``clip_sample``),
        ε̃ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)   (= ε̂ where the clamp changed nothing),
        x_t′ = √ᾱ_t′ x̂₀ + √(1 − ᾱ_t′ − σ_t²) ε̃ + σ_t z,   z ~ N(0, I).

    MONAI steps with ε̂ itself, beside the clamped x̂₀. Where the signal-to-noise ratio is near zero (the cosine
    schedule's ᾱ at T = 1000 is 2.4·10⁻⁹ at t = 999 and 2·10⁻⁴ at 990) x̂₀ is an error of ε̂ times 1/√ᾱ, clamped, and
    x_t′ is then mostly √(1 − ᾱ_t′) ε̂: a network whose ε̂ is 2 % too large grows the sample by 2 % a step there, so
    chains with many steps diverge (NaN at 1000 steps for a network in training) and the 50-step samples of such a
    network look noisier than its DDPM samples (``docs/generation.md`` compares the samplers on trained models).
    ε̃ is the noise that x_t and the clamped x̂₀ imply (GLIDE's "clipped model output"); at zero signal it is x_t
    itself, the exact answer.

    ``timesteps`` may be set to any descending sequence (the evaluation's reconstruction starts one at its t).
    Only ε-prediction is implemented (the bundle trains no other).

    Args:
        eta: η of the steps that are not given one: 0 is deterministic DDIM (what inversion and reconstruction need),
            1 draws as much fresh noise as DDPM does. At equal steps the noisy chain's samples came the closer to
            the data on the phantoms (docs/README.md, "Sampling").
        kwargs: MONAI's ``DDIMScheduler`` arguments (``num_train_timesteps``, ``schedule``, ``clip_sample``, …).

    Raises:
        BadInputError: for ``eta`` outside [0, 1] (``--eta``).
    """

    def __init__(self, *args, eta: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise BadInputError(
                f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: as noisy as DDPM), got {eta!r}."
            )
        self.eta = float(eta)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep of ``timesteps`` after ``timestep``; −1 (x₀, ᾱ = ``final_alpha_cumprod``) after the last."""
        below = self.timesteps[self.timesteps < timestep]
        return int(below.max()) if len(below) else -1

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t′, x̂₀)`` from ``model_output`` = ε̂ (B, C, *S) and ``sample`` = x_t (B, C, *S); ``eta`` None: the
        scheduler's."""
        eta = self.eta if eta is None else eta
        if self.prediction_type != "epsilon":
            raise NotImplementedError(
                f"GridDDIMScheduler predicts ε only, got prediction_type={self.prediction_type!r}."
            )
        previous = self.previous_timestep(int(timestep))
        alpha = self.alphas_cumprod[timestep]
        alpha_previous = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        original = predict_start_from_noise(sample, model_output, alpha)
        if self.clip_sample:
            original = original.clamp(*self.clip_sample_values)
            model_output = (sample - alpha.sqrt() * original) / (1 - alpha).sqrt()  # ε̃: the noise x̂₀ implies
        sigma = eta * self._get_variance(timestep, previous).sqrt()
        previous_sample = alpha_previous.sqrt() * original + (1 - alpha_previous - sigma**2).sqrt() * model_output
        if eta > 0:
            noise = torch.randn(
                model_output.shape, dtype=model_output.dtype, generator=generator, device=model_output.device
            )
            previous_sample = previous_sample + sigma * noise
        return previous_sample, original

    def invert_step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """DDIM inversion (η = 0): x_t from ``sample`` = x_t′, t′ the timestep after ``timestep`` (x₀ after the last),
        and ``model_output`` = ε̂ evaluated at x_t′ and t (where :meth:`step` would evaluate it at x_t; the two agree
        as the steps shrink): ``x_t = √ᾱ_t x̂₀ + √(1 − ᾱ_t) ε̂`` with ``x̂₀ = (x_t′ − √(1 − ᾱ_t′) ε̂) / √ᾱ_t′``, not
        clamped (an inversion must reach the noise that maps back to its input)."""
        previous = self.previous_timestep(int(timestep))
        alpha = self.alphas_cumprod[timestep]
        alpha_previous = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        original = predict_start_from_noise(sample, model_output, alpha_previous)
        return alpha.sqrt() * original + (1 - alpha).sqrt() * model_output


class DPMSolverScheduler(GridDDIMScheduler):
    """DPM-Solver++(2M) (Lu et al., 2022, "DPM-Solver++: Fast solver for guided sampling of diffusion probabilistic
    models", Algorithm 2): the multistep second-order solver of the probability-flow ODE in the data prediction
    x̂₀, stepping from each of its timesteps to the next (so every evaluation is at the noise level the sample has).

    With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ_t = log(α_t / σ_t) and h = λ_t′ − λ_t, the step from t to the next timestep
    t′ is

        x_t′ = (σ_t′ / σ_t) x_t − α_t′ (e^{−h} − 1) D,

    with D = (1 + 1/(2r)) x̂₀(t) − 1/(2r) x̂₀(t_prev), r = h_prev / h: the previous step's estimate extrapolates this
    one's to second order. The first step, the step into t = 0 and the last (to x₀, where σ = 0 and x₀ = x̂₀) take
    D = x̂₀(t), DDIM's first-order step: into t = 0 λ jumps several times the previous interval (ᾱ_0 is nearly 1),
    where the extrapolation overshoots (DPM-Solver's "lower order final steps"). x̂₀ is clamped as
    :class:`GridDDIMScheduler` clamps it. Deterministic: its :meth:`step` draws no noise and steps the whole batch,
    whose samples do not mix (each depends on its x_T only). :meth:`set_timesteps` forgets the previous estimate, so
    one scheduler serves chain after chain.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last: tuple[float, torch.Tensor] | None = None  # (λ, x̂₀) of the previous step

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps from T − 1 to 0 spaced quadratically, t_i = (T − 1)(1 − i / (n − 1))²
        (the distinct ones), dense near the data, where the solution bends most (DDIM's "quadratic" schedule)."""
        super().set_timesteps(num_inference_steps, device)
        last = self.num_train_timesteps - 1
        grid = (torch.linspace(1, 0, num_inference_steps, dtype=torch.float64) ** 2 * last).round().long()
        self.timesteps = torch.unique_consecutive(grid).to(self.timesteps.device)
        self._last = None

    @staticmethod
    def _lambda(alpha_cumprod: float) -> float:
        """λ = log(α / σ) of ᾱ (+∞ at ᾱ = 1)."""
        return 0.5 * (math.log(alpha_cumprod) - math.log1p(-alpha_cumprod)) if alpha_cumprod < 1 else math.inf

    def step(  # type: ignore[override]
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t′, x̂₀)`` from ``model_output`` = ε̂ (B, C, *S) and ``sample`` = x_t (B, C, *S)."""
        previous = self.previous_timestep(int(timestep))
        alpha = float(self.alphas_cumprod[timestep])
        alpha_next = float(self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod)
        original = predict_start_from_noise(sample, model_output, self.alphas_cumprod[timestep])
        if self.clip_sample:
            original = original.clamp(*self.clip_sample_values)
        here, there = self._lambda(alpha), self._lambda(alpha_next)
        estimate = original
        if self._last is not None and previous > 0:  # into t = 0 and x₀: first order
            ratio = (here - self._last[0]) / (there - here)
            estimate = (1 + 0.5 / ratio) * original - (0.5 / ratio) * self._last[1]
        self._last = (here, original)
        sigma, sigma_next = math.sqrt(1 - alpha), math.sqrt(1 - alpha_next)
        decay = (sigma_next / math.sqrt(alpha_next)) / (sigma / math.sqrt(alpha))  # e^{−h}
        return (sigma_next / sigma) * sample - math.sqrt(alpha_next) * (decay - 1) * estimate, original


class FlowEulerScheduler(RFlowScheduler):
    """Euler's method along the velocity v̂ = x̂₀ − ε̂ that a rectified flow model predicts
    (:mod:`~bundle.diffusion.objectives`), from t = T (pure noise) to 0, stepping from each of its timesteps to the
    next: with s = t / T,

        x_s′ = x_s + (s − s′) v̂,   x̂₀ = x_s + s v̂.

    MONAI's :class:`~monai.networks.schedulers.RFlowScheduler` samples the same way, but its ``set_timesteps`` passes
    the timesteps through float16 (above T = 2048 they are no longer the integers asked for) and its ``step`` without
    a ``next_timestep`` moves by 1 / n whatever the grid; here the step goes to the next timestep of ``timesteps``
    (to 0 after the last), as :class:`GridDDIMScheduler` does. Deterministic: the batch is stepped at once.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps t_i = round(T (1 − i / n)), i = 0 … n − 1, evenly spaced from T down."""
        super().set_timesteps(num_inference_steps, device)  # checks n against T
        total = self.num_train_timesteps
        grid = (torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float64)[:-1] * total).round().long()
        self.timesteps = torch.unique_consecutive(grid).to(self.timesteps.device)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep of ``timesteps`` after ``timestep``; 0 (x₀) after the last."""
        below = self.timesteps[self.timesteps < timestep]
        return int(below.max()) if len(below) else 0

    def step(  # type: ignore[override]
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t′, x̂₀)`` from ``model_output`` = v̂ (B, C, *S) and ``sample`` = x_t (B, C, *S)."""
        s = int(timestep) / self.num_train_timesteps
        s_next = self.previous_timestep(int(timestep)) / self.num_train_timesteps
        return sample + (s - s_next) * model_output, predict_start_from_velocity(sample, model_output, s)

    def invert_step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """Euler's step backwards: x_s from ``sample`` = x_s′, s′ the timestep after ``timestep`` (0 after the last),
        and ``model_output`` = v̂ evaluated at x_s′ and t: ``x_s = x_s′ − (s − s′) v̂``."""
        s = int(timestep) / self.num_train_timesteps
        s_next = self.previous_timestep(int(timestep)) / self.num_train_timesteps
        return sample - (s - s_next) * model_output


SAMPLERS: dict[str, dict[str, Callable[..., Scheduler]]] = {
    "epsilon": {
        "ddpm": DDPMScheduler,
        "ddim": GridDDIMScheduler,
        "pndm": partial(PNDMScheduler, skip_prk_steps=True),
        "dpm_solver": DPMSolverScheduler,
    },
    "rectified_flow": {"euler": FlowEulerScheduler},
}
"""The samplers of each objective (:data:`~bundle.diffusion.objectives.OBJECTIVES`) by name, each a MONAI noise
scheduler taking ``num_train_timesteps`` (the ε samplers also ``schedule``, DDIM ``eta``): a new sampler is one more
entry."""

DEFAULT_SAMPLERS = {"epsilon": "ddpm", "rectified_flow": "euler"}
"""The sampler a trained model of each objective samples with when none is named."""


def make_sampler(
    name: str | None, num_train_timesteps: int, schedule: str | None, eta: float = 0.0, objective: str = "epsilon"
) -> Scheduler:
    """The sampler ``name`` (:data:`SAMPLERS`; None: the objective's :data:`DEFAULT_SAMPLERS`) of a model trained
    with ``objective`` along the noise schedule ``schedule`` of T = ``num_train_timesteps`` (the trained model's, from
    its record; a rectified flow has no schedule); ``eta``: DDIM's stochasticity (0: deterministic, 1: DDPM-like).

    Raises:
        BadInputError: for a name that is no sampler of the objective, a ``schedule`` that is not MONAI's, or an
            ``eta`` other than 0 for a sampler other than DDIM.
    """
    samplers = SAMPLERS[objective]
    name = DEFAULT_SAMPLERS[objective] if name is None else name
    if name not in samplers:
        other = next((o for o in OBJECTIVES if o != objective and name in SAMPLERS[o]), None)
        trained = f" ({name} samples models trained with objective {other}; this one was trained with {objective})"
        raise BadInputError(f"sampler must be one of {sorted(samplers)}{trained if other else ''}; got {name!r}.")
    if name != "ddim" and eta != 0:
        raise BadInputError(
            f"eta sets DDIM's stochasticity (--sampler ddim); the {name} sampler takes none, got "
            f"eta={eta!r}: drop --eta."
        )
    options = {"eta": eta} if name == "ddim" else {}
    if objective == "epsilon":
        options["schedule"] = noise_schedule(schedule)
    return samplers[name](num_train_timesteps=num_train_timesteps, **options)


def monitoring_sampler(objective: str, num_train_timesteps: int, schedule: str | None) -> Scheduler:
    """The generation monitor's sampler for a run of ``objective``: DDIM with η = 1 for ε (fresh noise at each step,
    as the DDPM chain draws it), Euler for a rectified flow."""
    if objective == "epsilon":
        return make_sampler("ddim", num_train_timesteps, schedule, eta=1.0)
    return make_sampler("euler", num_train_timesteps, schedule, objective=objective)


FEW_STEPS = 50
"""The default number of steps of the samplers other than DDPM (whose default is the full chain of T)."""


class DiffusionSampler(Inferer):
    """``sampler(inputs, network)`` → images (B, C, *S) in [0, 1], with ``inputs`` only a shape reference; for a
    conditioned model (``conditioned``) ``inputs`` are the given modalities (B, K, *S) in [0, 1], which the network
    reads beside the sample at every step (:func:`~bundle.diffusion.maths.with_condition`): image in, image out.

    The chain runs over ``scheduler.timesteps`` after ``scheduler.set_timesteps(num_inference_steps)`` (at each call,
    which also resets a multistep scheduler's history, e.g. PNDM's), with a progress bar; the result, in the model's
    [−1, 1], is mapped to [0, 1]. Each sample has its own generator (:func:`~bundle.diffusion.noise.seeded_generator`
    of ``seed`` and the sample's index, counted over the calls: the first call's samples are 0 … B−1, the next call's
    continue from B), which draws its x_T ~ N(0, I) and, for a scheduler whose ``step`` takes a ``generator`` (DDPM,
    DDIM), the noise of its steps, stepped one sample at a time. So sample i depends only on ``seed`` and i, not on how
    the samples are batched, and a rerun repeats them. A scheduler whose step draws no noise (PNDM) steps the batch.

    Args:
        scheduler: a MONAI noise scheduler (``DDPMScheduler``, :class:`GridDDIMScheduler`, ``PNDMScheduler``, …) of the
            trained model's noise schedule.
        num_inference_steps: steps of the chain, in [1, T] (T, ``scheduler.num_train_timesteps``: the full DDPM chain);
            None: T for DDPM, :data:`FEW_STEPS` for the others.
        seed: seed of the run's samples.
        progress: show a progress bar over the steps.
        num_channels: channels to generate; default: those of ``inputs`` (set it when the reference
            input is, e.g., a one-channel image given by MONAI Label, and for a conditioned model).
        conditioned: ``inputs`` are the condition of a conditioned model (``condition_modalities``), not only a shape.

    Raises:
        BadInputError: for ``num_inference_steps`` outside [1, T].
    """

    def __init__(
        self,
        scheduler: Scheduler,
        num_inference_steps: int | None = None,
        seed: int = 0,
        progress: bool = True,
        num_channels: int | None = None,
        conditioned: bool = False,
    ) -> None:
        super().__init__()
        total = scheduler.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = total if type(scheduler) is DDPMScheduler else min(FEW_STEPS, total)
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= total
        ):
            raise BadInputError(
                f"num_inference_steps must be an integer between 1 and num_train_timesteps={total}, "
                f"got {num_inference_steps!r}."
            )
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.progress = progress
        self.num_channels = num_channels
        self.conditioned = conditioned
        self.drawn = 0  # samples generated so far: the index of the next one
        self._noisy_steps = "generator" in inspect.signature(scheduler.step).parameters

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """Samples ``inputs.shape[0]`` images of ``inputs``' spatial shape: (B, C, *S) in [0, 1]."""
        count, device = inputs.shape[0], inputs.device
        condition = to_model_range(inputs) if self.conditioned else None
        shape = (self.num_channels or inputs.shape[1], *inputs.shape[2:])
        generators = [seeded_generator(self.seed, self.drawn + i, device=device) for i in range(count)]
        self.drawn += count
        images = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
        self.scheduler.set_timesteps(self.num_inference_steps)
        with evaluating(network):
            for t in tqdm(self.scheduler.timesteps.tolist(), disable=not self.progress):
                prediction = network(
                    with_condition(images, condition), torch.full((count,), t, device=device, dtype=torch.long)
                )
                if not self._noisy_steps:
                    images = self.scheduler.step(prediction, t, images)[0]
                    continue
                images = torch.cat(
                    [  # one step per sample, each with its own generator (its step noise)
                        self.scheduler.step(prediction[i : i + 1], t, images[i : i + 1], generator=g)[0]
                        for i, g in enumerate(generators)
                    ]
                )
        return to_image_range(images).clamp(0, 1)

    def draw(
        self,
        network: nn.Module,
        num_samples: int,
        shape: tuple[int, ...],
        batch_size: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``num_samples`` images of ``shape`` (C, *S), sampled ``batch_size`` at a time on ``device`` (which batch
        size changes nothing: sample i depends on ``seed`` and i alone): (num_samples, C, *S) in [0, 1], on the CPU."""
        return torch.cat(
            [
                self(torch.zeros((min(batch_size, num_samples - start), *shape), device=device), network).cpu()
                for start in range(0, num_samples, batch_size)
            ]
        )


def invert(
    network: nn.Module,
    scheduler: GridDDIMScheduler | FlowEulerScheduler,
    images: torch.Tensor,
    num_inference_steps: int = FEW_STEPS,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """The noise x_T (B, C, *S) from which ``scheduler``'s deterministic chain of ``num_inference_steps`` (DDIM with
    η = 0, or a rectified flow's Euler steps) would sample ``images`` (B, C, *S) in [0, 1]: the chain run backwards
    (``invert_step``), from x₀ over the timesteps in ascending order; ``condition``: a conditioned model's given
    modalities (B, K, *S) in [0, 1]. The round trip (sampling from the result) returns the images up to the chain's
    discretisation error, which falls with the steps.

    Raises:
        BadInputError: for a scheduler that cannot be run backwards (DDPM's and DDIM's with η > 0 draw noise; PNDM's
            and DPM-Solver's multistep history is not inverted here).
    """
    if type(scheduler) not in (GridDDIMScheduler, FlowEulerScheduler) or getattr(scheduler, "eta", 0.0) != 0:
        raise BadInputError(
            f"Inversion runs a deterministic first-order chain backwards: --sampler ddim with --eta 0, or euler for a "
            f"rectified flow; got {type(scheduler).__name__}"
            + (f" with eta={scheduler.eta}" if getattr(scheduler, "eta", 0.0) else "")
            + "."
        )
    count, device = images.shape[0], images.device
    given = None if condition is None else to_model_range(condition)
    x = to_model_range(images)
    scheduler.set_timesteps(num_inference_steps)
    with evaluating(network):
        for t in reversed(scheduler.timesteps.tolist()):
            prediction = network(with_condition(x, given), torch.full((count,), t, device=device, dtype=torch.long))
            x = scheduler.invert_step(prediction, t, x)
    return x


def deterministic_chain(
    network: nn.Module,
    scheduler: GridDDIMScheduler | FlowEulerScheduler,
    x: torch.Tensor,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scheduler``'s deterministic chain (DDIM with η = 0, whatever the scheduler's own, or a rectified flow's Euler
    steps) over its ``timesteps`` as set, from ``x`` (B, C, *S) down to x₀, all in the model's [−1, 1] range, not
    clamped; ``condition``: a conditioned model's given modalities (B, K, *S) in that range, or None."""
    deterministic = {"eta": 0.0} if isinstance(scheduler, GridDDIMScheduler) else {}
    for t in scheduler.timesteps.tolist():
        prediction = network(with_condition(x, condition), torch.full((x.shape[0],), t, device=x.device))
        x = scheduler.step(prediction, t, x, **deterministic)[0]
    return x


def sample_from(
    network: nn.Module,
    scheduler: GridDDIMScheduler | FlowEulerScheduler,
    noise: torch.Tensor,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """The :func:`deterministic_chain` from ``noise`` = x_T (B, C, *S) in the model's range (e.g. what :func:`invert`
    reached), the network in eval mode without gradients: images (B, C, *S) in [0, 1], not clamped, so that a round
    trip's error shows in full. ``condition``: as :func:`invert`."""
    given = None if condition is None else to_model_range(condition)
    with evaluating(network):
        return to_image_range(deterministic_chain(network, scheduler, noise, given))
