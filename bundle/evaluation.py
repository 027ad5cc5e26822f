"""Evaluation of a checkpoint: the paper's Table 1 metrics and generation quality (paper §5; docs/README.md,
"Evaluation")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import Inferer
from monai.metrics import FIDMetric, MAEMetric, PSNRMetric, SSIMMetric
from monai.networks.schedulers import Scheduler
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .diffusion.engines import given_modalities
from .diffusion.maths import to_image_range, to_model_range
from .diffusion.noise import seeded_generator
from .diffusion.objectives import denoise_at
from .diffusion.sampling import FlowEulerScheduler, GridDDIMScheduler, deterministic_chain
from .errors import BadInputError
from .sample_quality import (
    compare_to_real,
    mean_pairwise,
    ms_ssim_settings,
    normalised_mmd,
    pairwise_ms_ssim,
    quality_summary,
)
from .settings import EvaluationSettings
from .synthesis import translate_split, translation_markdown, write_metrics

__all__ = ["evaluate", "reconstruct_from"]

logger = logging.getLogger(__name__)


def reconstruct_from(
    network: nn.Module,
    noisy: torch.Tensor,
    *,
    t_start: int,
    scheduler: GridDDIMScheduler | FlowEulerScheduler,
    num_inference_steps: int,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Runs ``scheduler``'s deterministic chain (:func:`~bundle.diffusion.sampling.deterministic_chain`: DDIM with
    η = 0, whatever the scheduler's own, or a rectified flow's Euler steps) from ``noisy`` = x_t at exactly
    ``t = t_start`` down to x₀.

    The steps are those of a ``num_inference_steps`` sampling chain, Δ = T // ``num_inference_steps`` apart, shifted to
    start at ``t_start``: t_start, t_start − Δ, …, down to the last t ≥ 0, whose step goes to x₀. (Starting at a step
    of the sampling grid below ``t_start`` would denoise x_{t_start} as if it were less noisy.)

    Args:
        network: the trained model, ``network(x, timesteps)``.
        noisy: x_{t_start}, (B, C, *S) in the model's [−1, 1] range.
        t_start: the timestep ``noisy`` was noised to, in [0, T).
        scheduler: the trained model's deterministic sampler (``TrainedModel.reconstruction_sampler``; its
            ``timesteps`` are replaced).
        num_inference_steps: the sampling chain whose step size the reconstruction takes.
        condition: a conditioned model's given modalities (B, K, *S) in [−1, 1], or None.

    Returns:
        The reconstruction x₀, (B, C, *S), clamped to [−1, 1].
    """
    step = max(1, scheduler.num_train_timesteps // int(num_inference_steps))  # a chain longer than T: every timestep
    scheduler.timesteps = torch.arange(t_start, -1, -step)
    return deterministic_chain(network, scheduler, noisy, condition).clamp(-1, 1)


def _per_modality(metric, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) metric values, each channel (modality) on its own."""
    return torch.stack(
        [metric(prediction[:, c : c + 1], target[:, c : c + 1]).reshape(-1) for c in range(target.shape[1])], dim=1
    )


def _summary(values: torch.Tensor, pair: int, higher_is_better: bool) -> dict:
    """Mean ± std over the split, and the mean of the best sample of each batch of ``pair`` (the paper's protocol)."""
    groups = values[: len(values) // pair * pair].reshape(-1, pair) if len(values) >= pair else values.reshape(1, -1)
    best = groups.max(1).values if higher_is_better else groups.min(1).values
    return {"mean": values.mean().item(), "std": values.std(unbiased=False).item(), "best_of_batch": best.mean().item()}


def evaluate(
    *,
    network: nn.Module,
    ckpt_path: str | Path,
    dataloader,
    noise_scheduler: Scheduler,
    reconstruction_scheduler: GridDDIMScheduler | FlowEulerScheduler,
    sampler: Inferer,
    modalities: Sequence[str],
    timesteps: Sequence[int],
    settings: EvaluationSettings,
    reference: Sequence[dict] | None = None,
    seed: int = 0,
    condition_modalities: Sequence[str] = (),
) -> dict:
    """Evaluates ``ckpt_path`` on the images of ``dataloader`` (batches of ``{"image", "case"}``: the validation
    split, which ``configs/evaluate.json`` takes from the training run's ``run.json``) and writes
    ``settings.outputs`` (``metrics.json`` and ``metrics.md`` in ``output_dir``), both naming the evaluated cases.

    * one-step denoising at each of ``timesteps`` (:func:`~bundle.diffusion.objectives.denoise_at`) and
      reconstruction through ``reconstruction_scheduler``'s deterministic chain from
      ``settings.reconstruction_timestep`` in steps of a ``settings.reconstruction_steps`` chain
      (:func:`reconstruct_from`): PSNR, SSIM and MAE per modality, in [0, 1] intensities, as mean ± std and
      best-of-batch (best of each consecutive ``evaluate_batch_size`` volumes: the paper's batch-2 protocol); batch i's
      noise comes from :func:`~bundle.diffusion.noise.seeded_generator` of (``seed``, i);
    * ``num_generated`` samples from ``sampler``: mean pairwise MS-SSIM among them (diversity; lower is
      more diverse), MMD to the real volumes (:func:`normalised_mmd` of the first min(validation volumes,
      ``num_generated``) of each; "n/a" with a single validation volume); FID when ``feature_extractor``
      names a TorchScript network mapping (B, 1, *S) volumes to (B, F) features (none is downloaded);
    * the same samples against the ``reference`` volumes (records with an ``image`` in [0, 1]: the validation or the
      training split, ``settings.generation_reference``; default: the evaluated volumes): every measure of
      :mod:`bundle.sample_quality` beside the real-vs-real spread (:func:`~bundle.sample_quality.compare_to_real`;
      "n/a" with fewer than 4 reference volumes).

    A conditioned model (``condition_modalities``; its batches hold ``condition``) is given its condition in each of
    these, and instead of unconditional samples ``sampler`` (conditioned) translates every case: PSNR, SSIM and MAE
    against the real volume, whole and in the head, its sharpness, and the identity baseline
    (:func:`~bundle.synthesis.translate_split`).

    Raises:
        BadInputError: for a checkpoint that does not fit ``network``, or an empty validation split (the settings
            were checked when ``settings`` was built).
    """
    device = torch.device(settings.device)
    pair = settings.evaluate_batch_size
    t_rec = settings.reconstruction_timestep
    network = load_checkpoint(network, ckpt_path).to(device).eval()
    size = None
    psnr, ssim, mae = PSNRMetric(max_val=1.0, reduction="none"), None, MAEMetric(reduction="none")
    scores: dict[str, dict[str, list[torch.Tensor]]] = {}
    reals, cases = [], []
    with torch.no_grad():
        for index, batch in enumerate(tqdm(dataloader, desc="evaluating")):
            generator = seeded_generator(seed, index)
            x0 = to_model_range(batch["image"].to(device))
            condition = given_modalities(batch, device)
            size = size or tuple(x0.shape[2:])
            ssim = ssim or SSIMMetric(
                spatial_dims=len(size), data_range=1.0, win_size=min(7, min(size)), reduction="none"
            )
            target = to_image_range(x0)
            reals.append(target.cpu())
            cases.extend(batch["case"])
            estimates = {
                f"one-step t={t}": denoise_at(network, noise_scheduler, x0, t, generator, condition)["denoised"]
                for t in timesteps
            }
            noise = torch.randn(x0.shape, generator=generator).to(device)
            noisy = noise_scheduler.add_noise(x0, noise, torch.full((x0.shape[0],), t_rec, device=device))
            estimates[f"reconstruction from t={t_rec}"] = reconstruct_from(
                network,
                noisy,
                t_start=t_rec,
                scheduler=reconstruction_scheduler,
                num_inference_steps=settings.reconstruction_steps,
                condition=condition,
            )
            for name, estimate in estimates.items():
                estimate = to_image_range(estimate)
                entry = scores.setdefault(name, {"psnr": [], "ssim": [], "mae": []})
                entry["psnr"].append(_per_modality(psnr, estimate, target).cpu())
                entry["ssim"].append(_per_modality(ssim, estimate, target).cpu())
                entry["mae"].append(_per_modality(mae, estimate, target).cpu())
    if size is None:
        raise BadInputError("The validation split is empty: there is nothing to evaluate.")
    results: dict = {
        "checkpoint": str(ckpt_path),
        "num_volumes": int(sum(len(r) for r in reals)),
        "cases": cases,
        "best_of_batch_size": pair,
    }
    for name, entry in scores.items():
        results[name] = {
            modality: {
                metric: _summary(torch.cat(values)[:, c], pair, metric != "mae") for metric, values in entry.items()
            }
            for c, modality in enumerate(modalities)
        }
    reals = torch.cat(reals)
    if condition_modalities:
        results["generation"] = {"note": "a conditioned model: its samples are measured as translations"}
        with torch.no_grad():
            results["translation"] = translate_split(
                network, sampler, dataloader, modalities, condition_modalities, pair, device
            )
    else:
        references = reals if reference is None else torch.stack([torch.as_tensor(r["image"]) for r in reference])
        results["generation"] = _generation_quality(
            network, sampler, reals, references.float(), modalities, settings, size, device, seed
        )
    lines = _markdown(results, modalities)
    if condition_modalities:
        lines += ["", *translation_markdown(results["translation"], modalities, "IDM")]
    write_metrics(settings, results, lines)
    return results


def _generation_quality(
    network,
    sampler,
    reals: torch.Tensor,
    references: torch.Tensor,
    modalities: Sequence[str],
    settings: EvaluationSettings,
    size,
    device,
    seed: int,
) -> dict:
    """Diversity, MMD and FID of ``settings.num_generated`` samples against the validation volumes ``reals``
    (N, C, *S), and the measures of :mod:`bundle.sample_quality` against ``references`` (R, C, *S)."""
    num_generated, feature_extractor = settings.num_generated, settings.feature_extractor
    if sampler is None or num_generated < 2:
        return {"note": "skipped (needs a sampler and num_generated ≥ 2)"}
    generated = sampler.draw(network, num_generated, tuple(reals.shape[1:]), 1, device)
    quality = {
        "num_generated": num_generated,
        "ms_ssim_pairwise_mean": mean_pairwise(pairwise_ms_ssim(generated)),
        "ms_ssim_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in ms_ssim_settings(size).items()},
    }
    if len(reals) < 2:
        quality["mmd"] = "n/a (needs at least 2 validation volumes)"
    else:
        quality["mmd"], n = normalised_mmd(reals, generated)
        quality["mmd_num_volumes"] = n
        quality["mmd_definition"] = (
            f"MONAI MMDMetric (unbiased MMD², linear kernel) between the first {n} validation and first {n} generated "
            f"volumes, divided by the {reals[0].numel()} values per volume (channels × voxels)"
        )
    quality["reference"] = f"{settings.generation_reference} split, {len(references)} volumes"
    if len(references) < 4:
        quality["comparison"] = "n/a (the real-vs-real spread needs at least 4 reference volumes)"
    elif not torch.isfinite(generated).all():
        quality["comparison"] = "n/a (the samples hold non-finite values: the sampling chain diverged)"
    else:
        quality["comparison"] = compare_to_real(generated, references, modalities, seed=seed)
        logger.info("generated vs %s: %s", settings.generation_reference, quality_summary(quality["comparison"]))
    quality["fid"] = "n/a (pass --feature_extractor with a TorchScript feature network)"
    if feature_extractor is not None:
        extractor = torch.jit.load(feature_extractor, map_location=device).eval()
        with torch.no_grad():
            features = lambda v: torch.cat([extractor(v[:, c : c + 1].to(device)) for c in range(v.shape[1])]).cpu()
            quality["fid"] = FIDMetric()(features(generated), features(reals)).item()
    return quality


def _markdown(results: dict, modalities: Sequence[str]) -> list[str]:
    lines = [
        f"# Evaluation of {results['checkpoint']}",
        "",
        (
            f"{results['num_volumes']} validation volumes; intensities in [0, 1]. Best-of-batch: the best of each "
            f"batch of {results['best_of_batch_size']} volumes (the paper's protocol), averaged."
        ),
        "",
        f"Cases: {', '.join(results['cases'])}.",
        "",
        (
            "| run | modality | PSNR mean ± std | PSNR best-of-batch | SSIM mean ± std | SSIM best-of-batch | "
            "MAE mean ± std | MAE best-of-batch |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, per_modality in results.items():
        if not isinstance(per_modality, dict) or not set(modalities) <= set(per_modality):
            continue
        for modality in modalities:
            m = per_modality[modality]
            lines.append(
                f"| {name} | {modality} | {m['psnr']['mean']:.2f} ± {m['psnr']['std']:.2f} | "
                f"{m['psnr']['best_of_batch']:.2f} | {m['ssim']['mean']:.3f} ± {m['ssim']['std']:.3f} | "
                f"{m['ssim']['best_of_batch']:.3f} | {m['mae']['mean']:.3f} ± {m['mae']['std']:.3f} | "
                f"{m['mae']['best_of_batch']:.3f} |"
            )
    generation = results["generation"]
    lines += ["", "## Generation", ""] + [f"- {k}: {v}" for k, v in generation.items() if k != "comparison"]
    comparison = generation.get("comparison")
    if isinstance(comparison, dict):
        lines += (
            [
                "",
                f"### Generated vs real ({generation['reference']})",
                "",
                (
                    f"{quality_summary(comparison)}. Distance between {comparison['set_size']} generated and "
                    f"{comparison['set_size']} real volumes (mean over {comparison['num_splits']} random splits), "
                    "beside the "
                    "distance between two disjoint halves of the real volumes over the same splits "
                    "(bundle.sample_quality)."
                ),
                "",
                "| measure | generated vs real | real vs real mean | real vs real max | within |",
                "|---|---|---|---|---|",
            ]
            + [
                f"| {name} | {m['generated_vs_real']:.4g} | {m['real_vs_real_mean']:.4g} | "
                f"{m['real_vs_real_max']:.4g} | "
                f"{'yes' if m['within_spread'] else 'no'} |"
                for name, m in comparison["measures"].items()
            ]
            + ["", "| statistic (set mean) | generated | real |", "|---|---|---|"]
            + [f"| {name} | {v['generated']:.3f} | {v['real']:.3f} |" for name, v in comparison["statistics"].items()]
        )
    elif comparison is not None:
        lines.append(f"- comparison with real volumes: {comparison}")
    return lines
