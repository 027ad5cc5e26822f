"""Evaluation of a checkpoint: the paper's Table 1 metrics and generation quality (DESIGN §3, paper §5)."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import Inferer
from monai.metrics import FIDMetric, MAEMetric, MMDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.networks.schedulers import Scheduler
from torch import nn
from tqdm import tqdm

from .diffusion.engines import one_step_denoise, to_model_range
from .diffusion.noise import seeded_generator
from .diffusion.sampling import make_sampling_scheduler
from .errors import BadInputError
from .flags import as_flag
from .inference import load_checkpoint
from .settings import check_output_folder

__all__ = ["reconstruct_from", "ms_ssim_settings", "normalised_mmd", "check_settings", "evaluate"]

logger = logging.getLogger(__name__)


def reconstruct_from(network: nn.Module, noisy: torch.Tensor, t_start: int, num_train_timesteps: int,
                     num_inference_steps: int) -> torch.Tensor:
    """Runs the DDIM chain (cosine schedule, η = 0) from ``noisy`` = x_t at exactly ``t = t_start`` down to x₀.

    The steps are those of a ``num_inference_steps`` sampling chain, Δ = ``num_train_timesteps // num_inference_steps``
    apart, shifted to start at ``t_start``: t_start, t_start − Δ, …, down to the last t ≥ 0, whose step goes to x₀.
    (Starting at a step of the sampling grid below ``t_start`` would denoise x_{t_start} as if it were less noisy.)

    Args:
        network: the noise predictor, ``network(x, timesteps)``.
        noisy: x_{t_start}, (B, C, *S) in the model's [−1, 1] range.
        t_start: the timestep ``noisy`` was noised to, in [0, num_train_timesteps).
        num_train_timesteps: T of the trained model.
        num_inference_steps: the sampling chain whose step size the reconstruction takes.

    Returns:
        The reconstruction x₀, (B, C, *S), clamped to [−1, 1].
    """
    scheduler = make_sampling_scheduler("ddim", num_train_timesteps, num_inference_steps)
    scheduler.timesteps = torch.arange(t_start, -1, -(num_train_timesteps // int(num_inference_steps)))
    x = noisy
    for t in scheduler.timesteps.tolist():
        x, _ = scheduler.step(network(x, torch.full((x.shape[0],), t, device=x.device)), t, x)
    return x.clamp(-1, 1)


def ms_ssim_settings(spatial_size: Sequence[int]) -> dict:
    """A kernel size and scale weights for MS-SSIM that fit a volume of ``spatial_size``: each scale halves
    the volume and must still hold the kernel; at 64³ that is kernel 7 with 4 scales."""
    smallest = min(spatial_size)
    kernel = 7 if smallest >= 32 else 3
    scales = max(1, min(5, int(math.log2(smallest / kernel)) + 1))
    return {"kernel_size": kernel, "weights": tuple([1.0 / scales] * scales)}


def normalised_mmd(real: torch.Tensor, generated: torch.Tensor) -> tuple[float, int]:
    """MONAI's :class:`~monai.metrics.MMDMetric` (the unbiased estimate of MMD² with a linear kernel) between the
    first ``n = min(len(real), len(generated))`` volumes of each set (it needs equally many), divided by the
    number of values per volume (channels × voxels).

    So normalised it reads, whatever the volume size, as the mean over voxels of the squared difference between
    the two sets' mean volumes, less each set's per-voxel variance / (n − 1): at most 1 for intensities in
    [0, 1], about 0 when the sets come from one distribution (the unbiased estimate can then be slightly negative).

    Args:
        real: (N, C, *S) volumes.
        generated: (M, C, *S) volumes.

    Returns:
        The normalised MMD and ``n``.

    Raises:
        ValueError: when either set has fewer than 2 volumes.
    """
    n = min(len(real), len(generated))
    if n < 2:
        raise ValueError(f"MMD needs at least 2 volumes in each set, got {len(real)} and {len(generated)}.")
    return MMDMetric()(real[:n], generated[:n]).item() / real[0].numel(), n


def check_settings(
    output_dir: str | Path,
    overwrite: bool | str,
    reconstruction_timestep: int,
    num_train_timesteps: int,
    feature_extractor: str | None = None,
) -> list[Path]:
    """Checks the settings of :func:`evaluate` that need neither data nor network, so that a bad one stops evaluation
    before any work; returns the paths it will write, ``output_dir/metrics.json`` and ``output_dir/metrics.md``.

    Raises:
        BadInputError: when ``output_dir`` is a file or cannot be created (naming what is in the way), holds an
            earlier evaluation's metrics and ``overwrite`` is false, ``reconstruction_timestep`` is outside
            [0, num_train_timesteps), or ``feature_extractor`` names no file.
    """
    overwrite = as_flag(overwrite, "overwrite")
    output_dir = Path(output_dir)
    outputs = [output_dir / "metrics.json", output_dir / "metrics.md"]
    check_output_folder(output_dir, "output_dir")
    if any(p.exists() for p in outputs) and not overwrite:
        raise BadInputError(f"{outputs[0]} already exists; pass --overwrite true or choose another --output_dir.")
    if not 0 <= reconstruction_timestep < num_train_timesteps:
        raise BadInputError(
            f"reconstruction_timestep {reconstruction_timestep} is outside [0, {num_train_timesteps - 1}]; set "
            "--reconstruction_fraction in [0, 1)."
        )
    if feature_extractor is not None and not Path(feature_extractor).is_file():
        raise BadInputError(f"feature_extractor {feature_extractor!r} does not exist; give a TorchScript file or null.")
    return outputs


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
    network: nn.Module,
    ckpt_path: str | Path,
    dataloader,
    scheduler: Scheduler,
    modalities: Sequence[str],
    output_dir: str | Path,
    timesteps: Sequence[int],
    reconstruction_timestep: int,
    num_inference_steps: int = 50,
    num_generated: int = 4,
    sampler: Inferer | None = None,
    feature_extractor: str | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    pair: int = 2,
    seed: int = 0,
) -> dict:
    """Evaluates ``ckpt_path`` on the images of ``dataloader`` (batches of ``{"image", "case"}``: the validation
    split, which ``configs/evaluate.json`` takes from the training run's ``geometry.json``) and writes
    ``output_dir/metrics.json`` and ``output_dir/metrics.md``, both naming the evaluated cases.

    * one-step denoising at each of ``timesteps`` and reconstruction through the DDIM chain from
      ``reconstruction_timestep``: PSNR, SSIM and MAE per modality, in [0, 1] intensities, as mean ± std
      and best-of-batch (best of each consecutive ``pair`` of volumes: the paper's batch-2 protocol); batch i's
      noise comes from :func:`~bundle.diffusion.noise.seeded_generator` of (``seed``, i);
    * ``num_generated`` samples from ``sampler``: mean pairwise MS-SSIM among them (diversity; lower is
      more diverse), MMD to the real volumes (:func:`normalised_mmd` of the first min(validation volumes,
      ``num_generated``) of each; "n/a" with a single validation volume); FID when ``feature_extractor``
      names a TorchScript network mapping (B, 1, *S) volumes to (B, F) features (none is downloaded).

    Raises:
        BadInputError: for the settings :func:`check_settings` refuses (before any work), a checkpoint that does not
            fit ``network``, or an empty validation split.
    """
    outputs = check_settings(output_dir, overwrite, reconstruction_timestep, scheduler.num_train_timesteps,
                             feature_extractor)
    network = load_checkpoint(network, ckpt_path).to(device).eval()
    size = None
    psnr, ssim, mae = PSNRMetric(max_val=1.0, reduction="none"), None, MAEMetric(reduction="none")
    scores: dict[str, dict[str, list[torch.Tensor]]] = {}
    reals, cases = [], []
    with torch.no_grad():
        for index, batch in enumerate(tqdm(dataloader, desc="evaluating")):
            generator = seeded_generator(seed, index)
            x0 = to_model_range(batch["image"].to(device))
            size = size or tuple(x0.shape[2:])
            ssim = ssim or SSIMMetric(spatial_dims=len(size), data_range=1.0, win_size=min(7, min(size)), reduction="none")
            reals.append(((x0 + 1) / 2).cpu())
            cases.extend(batch["case"])
            target = (x0 + 1) / 2
            runs = {f"one-step t={t}": t for t in timesteps} | {f"reconstruction from t={reconstruction_timestep}": None}
            for name, t in runs.items():
                t_value = reconstruction_timestep if t is None else t
                noise = torch.randn(x0.shape, generator=generator).to(device)
                t_batch = torch.full((x0.shape[0],), t_value, device=device, dtype=torch.long)
                noisy = scheduler.add_noise(x0, noise, t_batch)
                if t is None:
                    estimate = reconstruct_from(network, noisy, t_value, scheduler.num_train_timesteps, num_inference_steps)
                else:
                    estimate = one_step_denoise(scheduler, noisy, network(noisy, t_batch), t_batch)
                estimate = (estimate + 1) / 2
                entry = scores.setdefault(name, {"psnr": [], "ssim": [], "mae": []})
                entry["psnr"].append(_per_modality(psnr, estimate, target).cpu())
                entry["ssim"].append(_per_modality(ssim, estimate, target).cpu())
                entry["mae"].append(_per_modality(mae, estimate, target).cpu())
    if size is None:
        raise BadInputError("The validation split is empty: there is nothing to evaluate.")
    results: dict = {"checkpoint": str(ckpt_path), "num_volumes": int(sum(len(r) for r in reals)), "cases": cases,
                     "best_of_batch_size": pair}
    for name, entry in scores.items():
        results[name] = {
            modality: {
                metric: _summary(torch.cat(values)[:, c], pair, metric != "mae") for metric, values in entry.items()
            }
            for c, modality in enumerate(modalities)
        }
    results["generation"] = _generation_quality(network, sampler, torch.cat(reals), num_generated, feature_extractor,
                                                size, device)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    outputs[0].write_text(json.dumps(results, indent=1))
    outputs[1].write_text(_markdown(results, modalities))
    logger.info("wrote %s and %s", *outputs)
    return results


def _generation_quality(network, sampler, reals: torch.Tensor, num_generated: int, feature_extractor, size, device) -> dict:
    """Diversity, MMD and FID of ``num_generated`` samples against the validation volumes ``reals`` (N, C, *S)."""
    if sampler is None or num_generated < 2:
        return {"note": "skipped (needs a sampler and num_generated ≥ 2)"}
    generated = torch.cat(
        [sampler(torch.zeros((1, *reals.shape[1:]), device=device), network).cpu() for _ in range(num_generated)]
    )
    ms_ssim = MultiScaleSSIMMetric(spatial_dims=len(size), data_range=1.0, **ms_ssim_settings(size))
    pairwise = [ms_ssim(generated[i : i + 1], generated[j : j + 1]).item()
                for i, j in itertools.combinations(range(len(generated)), 2)]
    quality = {
        "num_generated": num_generated,
        "ms_ssim_pairwise_mean": sum(pairwise) / len(pairwise),
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
    quality["fid"] = "n/a (pass --feature_extractor with a TorchScript feature network)"
    if feature_extractor is not None:
        extractor = torch.jit.load(feature_extractor, map_location=device).eval()
        with torch.no_grad():
            features = lambda v: torch.cat([extractor(v[:, c : c + 1].to(device)) for c in range(v.shape[1])]).cpu()  # noqa: E731
            quality["fid"] = FIDMetric()(features(generated), features(reals)).item()
    return quality


def _markdown(results: dict, modalities: Sequence[str]) -> str:
    lines = [
        f"# Evaluation of {results['checkpoint']}",
        "",
        f"{results['num_volumes']} validation volumes; intensities in [0, 1]. Best-of-batch: the best of each "
        f"batch of {results['best_of_batch_size']} volumes (the paper's protocol), averaged.",
        "",
        f"Cases: {', '.join(results['cases'])}.",
        "",
        "| run | modality | PSNR mean ± std | PSNR best-of-batch | SSIM mean ± std | SSIM best-of-batch | "
        "MAE mean ± std | MAE best-of-batch |",
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
    lines += ["", "## Generation", ""] + [f"- {k}: {v}" for k, v in results["generation"].items()]
    return "\n".join(lines) + "\n"
