"""Missing-modality synthesis measured (``docs/synthesis.md``): translations against ground truth with the identity
baseline (:func:`translation_scores`, :func:`translate_split`, :func:`evaluate_translation`), and the classic
baseline, a deterministic L1 regression trained and evaluated by the same configs (:func:`condition_and_target`,
:class:`RegressionInferer`). The inference on real inputs is :mod:`bundle.translation`'s."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.inferers import Inferer
from monai.metrics import MAEMetric, PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .data.transforms import foreground
from .diffusion.maths import to_image_range, to_model_range
from .errors import BadInputError
from .settings import EvaluationSettings
from .utils import evaluating

__all__ = [
    "RegressionInferer",
    "condition_and_target",
    "evaluate_translation",
    "mean_std",
    "regression_inputs",
    "translation_scores",
]

logger = logging.getLogger(__name__)

SSIM_WINDOW = 7  # the validation's and the evaluation's SSIM window (Gaussian, σ 1.5)


def regression_inputs(condition_modalities: Sequence[str]) -> int:
    """The input channels of a regression baseline (``configs/regression.json``): one per given modality.

    Raises:
        BadInputError: without given modalities (a regression has nothing to map from).
    """
    if not condition_modalities:
        raise BadInputError(
            "configs/regression.json trains a regression from the given to the generated modalities, but "
            "condition_modalities is empty: pass e.g. --condition_modalities \"['t1']\" --modalities \"['t2']\"."
        )
    return len(condition_modalities)


def condition_and_target(batchdata: Mapping, device: torch.device | str, non_blocking: bool = False, **kwargs):
    """``(condition, image)`` of a batch in the model's [−1, 1]: the inputs and targets of a supervised regression from
    the given to the generated modalities (MONAI ``SupervisedTrainer``'s ``prepare_batch``)."""
    move = lambda key: to_model_range(batchdata[key].to(device, non_blocking=non_blocking))
    return move("condition"), move("image")


class RegressionInferer(Inferer):
    """``inferer(condition, network)`` → the generated modalities (B, C, *S) in [0, 1] of a deterministic regression
    network from the given ones (B, K, *S) in [0, 1] (trained on [−1, 1], :func:`condition_and_target`): one forward
    pass, image in, image out, like :class:`~bundle.diffusion.DiffusionSampler` with ``conditioned``."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        with evaluating(network):
            output = network(to_model_range(inputs))
        return to_image_range(output).clamp(0, 1)


def _ssim_map(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The SSIM map of two (1, *S) volumes (Gaussian window of :data:`SSIM_WINDOW` voxels, σ 1.5, data range 1, as
    MONAI's ``SSIMMetric``) over the windows that lie inside the volume, and its margin: voxel ``margin + i`` of the
    volume is the centre of the map's window ``i``."""
    dims = target.ndim - 1
    window = min(SSIM_WINDOW, *target.shape[1:])
    ssim_map = compute_ssim_and_cs(prediction[None], target[None], dims, [window] * dims, [1.5] * dims)[0][0, 0]
    return ssim_map, window // 2


def _mean_inside(ssim_map: torch.Tensor, margin: int, mask: torch.Tensor) -> float:
    """The mean of ``ssim_map`` over the windows centred in the (1, *S) ``mask``; NaN where none is."""
    inner = mask[0][tuple(slice(margin, margin + s) for s in ssim_map.shape)]
    return ssim_map[inner].mean().item() if inner.any() else float("nan")


def _sharpness(volume: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean gradient magnitude (central differences, per voxel) of a (1, *S) volume inside ``mask``."""
    grads = torch.gradient(volume[0])
    return torch.sqrt(sum(g.square() for g in grads))[mask[0]].mean().item()


def percentile_normalise(volume: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BraSyn's intensity normalisation: ``volume`` clipped to the 0.5th and 99.5th percentiles of ``reference``'s
    voxels in ``mask`` (the lower one not below 0), scaled to [0, 1] and zeroed outside ``mask``; the real volume is
    the reference of both the real and the generated one, so a generated volume's intensity errors are kept."""
    inside = reference[mask].float()
    low, high = torch.quantile(inside[:: max(1, inside.numel() // 1_000_000)], torch.tensor([0.005, 0.995]))
    low = low.clamp(min=0)
    return (volume.clamp(low, high) - low) / (high - low).clamp(min=1e-12) * mask


def translation_scores(
    prediction: torch.Tensor, target: torch.Tensor, seg: torch.Tensor | None = None
) -> dict[str, float]:
    """The measures of a generated (1, *S) volume against the real one, both in [0, 1]:

    * PSNR (dB), SSIM and MAE over the whole volume and inside the head (``head_`` prefix: the real volume's
      :func:`~bundle.data.transforms.foreground`);
    * the BraSyn challenge's (``brasyn_``): both volumes :func:`percentile_normalise`-d inside the head, then PSNR
      over the head's voxels and the mean SSIM over the windows centred in the head (``brasyn_ssim``), in the tumour
      (``tumour_ssim``: ``seg`` > 0, any BraTS or Decathlon label) and in the rest of the head (``healthy_ssim``);
      NaN without a ``seg`` (1, *S) or, for the tumour, in a case without one;
    * ``sharpness``: the generated volume's mean gradient magnitude inside the head over the real one's (1: as sharp
      as the data; a regression's blur gives less).
    """
    mask = foreground(target)
    ssim_map, margin = _ssim_map(prediction, target)
    whole, head = (prediction[None], target[None]), (prediction[mask][None, None], target[mask][None, None])
    psnr, mae = PSNRMetric(max_val=1.0), MAEMetric()  # MONAI's, as validation and evaluation compute them
    normalised = [percentile_normalise(volume, target, mask) for volume in (prediction, target)]
    brasyn_map, _ = _ssim_map(*normalised)
    tumour = mask & (seg > 0) if seg is not None else None
    return {
        "psnr": psnr(*whole).item(),
        "ssim": ssim_map.mean().item(),
        "mae": mae(*whole).item(),
        "head_psnr": psnr(*head).item(),
        "head_ssim": _mean_inside(ssim_map, margin, mask),
        "head_mae": mae(*head).item(),
        "brasyn_psnr": psnr(*(v[mask][None, None] for v in normalised)).item(),
        "brasyn_ssim": _mean_inside(brasyn_map, margin, mask),
        "tumour_ssim": float("nan") if tumour is None else _mean_inside(brasyn_map, margin, tumour),
        "healthy_ssim": float("nan") if tumour is None else _mean_inside(brasyn_map, margin, mask & ~tumour),
        "sharpness": _sharpness(prediction, mask) / max(_sharpness(target, mask), 1e-12),
    }


HIGHER_IS_BETTER = {
    "psnr": True,
    "ssim": True,
    "mae": False,
    "head_psnr": True,
    "head_ssim": True,
    "head_mae": False,
    "brasyn_psnr": True,
    "brasyn_ssim": True,
    "tumour_ssim": True,
    "healthy_ssim": True,
    "sharpness": True,
}


def _summary(values: list[float | None], pair: int, higher_is_better: bool) -> dict:
    """Mean ± std over the cases that have the measure (``cases``: how many; a case without a tumour has no
    ``tumour_ssim``), and the mean of the best case of each consecutive ``pair`` of them (the paper's best-of-batch
    protocol); None for a measure no case has."""
    v = torch.tensor([value for value in values if value is not None], dtype=torch.float64)
    if not len(v):
        return {"mean": None, "std": None, "best_of_batch": None, "cases": 0}
    groups = v[: len(v) // pair * pair].reshape(-1, pair) if len(v) >= pair else v.reshape(1, -1)
    best = groups.max(1).values if higher_is_better else groups.min(1).values
    return {
        "mean": v.mean().item(),
        "std": v.std(unbiased=False).item(),
        "best_of_batch": best.mean().item(),
        "cases": len(v),
    }


def translate_split(
    network: nn.Module,
    inferer: Inferer,
    dataloader,
    modalities: Sequence[str],
    condition_modalities: Sequence[str],
    pair: int,
    device: torch.device | str,
) -> dict:
    """The translation measures (:func:`translation_scores`) of ``inferer``'s outputs from each batch's
    ``condition`` against its ``image`` (batches of ``{"image", "condition", "case"}`` in [0, 1], and ``"seg"``, the
    tumour labels, where the data has them: :func:`~bundle.data.preprocessing` with ``segmentation``), per generated
    modality, for the model (``"model"``) and the identity baseline (``"identity"``: the first given modality itself,
    after the same preprocessing), each as :func:`_summary` over the cases; also the per-case values (None where a case
    has no such measure) and ``cases``."""
    per_case: dict[str, dict[str, dict[str, list[float | None]]]] = {"model": {}, "identity": {}}
    cases = []
    for batch in tqdm(dataloader, desc="translating"):
        condition, target = batch["condition"].to(device), batch["image"].to(device)
        segs = batch["seg"].to(device) if "seg" in batch else [None] * len(target)
        generated = inferer(condition, network)
        cases.extend(batch["case"])
        for i in range(target.shape[0]):
            for c, modality in enumerate(modalities):
                real = target[i, c : c + 1].float()
                for name, estimate in (("model", generated[i, c : c + 1]), ("identity", condition[i, :1])):
                    entry = per_case[name].setdefault(modality, {})
                    for metric, value in translation_scores(estimate.float(), real, segs[i]).items():
                        entry.setdefault(metric, []).append(None if math.isnan(value) else value)
    if not cases:
        raise BadInputError("The validation split is empty: there is nothing to evaluate.")
    return {
        "given": list(condition_modalities),
        "cases": cases,
        "best_of_batch_size": pair,
        **{
            name: {
                modality: {metric: _summary(values, pair, HIGHER_IS_BETTER[metric]) for metric, values in entry.items()}
                for modality, entry in runs.items()
            }
            for name, runs in per_case.items()
        },
        "per_case": per_case,
    }


def mean_std(summary: Mapping, digits: int) -> str:
    """A measure's :func:`_summary` as ``mean ± std`` with ``digits`` decimals; ``–`` where no case has it."""
    return "–" if summary["mean"] is None else f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def translation_markdown(translation: dict, modalities: Sequence[str], label: str = "model") -> list[str]:
    """The tables of :func:`translate_split`'s results (model and identity baseline), as Markdown lines: the
    measures in [0, 1] intensities, then the BraSyn challenge's."""

    def cell(m: dict, metric: str, digits: int) -> str:
        return mean_std(m[metric], digits)

    runs = [(label if name == "model" else "identity", translation[name]) for name in ("model", "identity")]
    lines = [
        f"## Translation from {', '.join(translation['given'])} to {', '.join(modalities)}",
        "",
        (
            f"{len(translation['cases'])} validation cases; [0, 1] intensities; head: the real volume's foreground; "
            f"best-of-batch: the best of each {translation['best_of_batch_size']} consecutive cases, averaged; "
            "sharpness: the mean gradient magnitude in the head, generated over real. Identity: the given "
            f"{translation['given'][0]} volume itself."
        ),
        "",
        (
            "| run | modality | PSNR | SSIM | MAE | head PSNR | head SSIM | head MAE | PSNR best-of-batch | "
            "SSIM best-of-batch | sharpness |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs:
        for modality in modalities:
            m = run[modality]
            lines.append(
                f"| {name} | {modality} | {cell(m, 'psnr', 2)} | {cell(m, 'ssim', 3)} | {cell(m, 'mae', 3)} | "
                f"{cell(m, 'head_psnr', 2)} | {cell(m, 'head_ssim', 3)} | {cell(m, 'head_mae', 3)} | "
                f"{m['psnr']['best_of_batch']:.2f} | {m['ssim']['best_of_batch']:.3f} | {m['sharpness']['mean']:.2f} |"
            )
    tumours = translation["model"][modalities[0]]["tumour_ssim"]["cases"]
    lines += [
        "",
        (
            "BraSyn's measures: both volumes clipped to the real one's 0.5th–99.5th percentiles in the head and "
            "scaled to [0, 1], PSNR over the head, SSIM over the windows centred in the head, in the tumour (the "
            f"`seg` labels; {tumours} of the cases have one) and in the rest of the head (healthy)."
        ),
        "",
        "| run | modality | PSNR | SSIM | SSIM tumour | SSIM healthy |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {modality} | {cell(run[modality], 'brasyn_psnr', 2)} | "
            f"{cell(run[modality], 'brasyn_ssim', 3)} | {cell(run[modality], 'tumour_ssim', 3)} | "
            f"{cell(run[modality], 'healthy_ssim', 3)} |"
            for name, run in runs
            for modality in modalities
        ),
    ]
    return lines


def evaluate_translation(
    *,
    network: nn.Module,
    ckpt_path: str | Path,
    inferer: Inferer,
    dataloader,
    modalities: Sequence[str],
    condition_modalities: Sequence[str],
    settings: EvaluationSettings,
) -> dict:
    """Evaluates a regression checkpoint (the baseline, e.g. MONAI's ``UNet`` trained by ``configs/regression.json``)
    as a translator from ``condition_modalities`` to ``modalities`` on the validation split
    (:func:`translate_split`) and writes ``metrics.json`` and ``metrics.md`` to ``settings.output_dir``.

    Raises:
        BadInputError: for a checkpoint that does not fit ``network``, or an empty validation split.
    """
    device = torch.device(settings.device)
    network = load_checkpoint(network, ckpt_path).to(device).eval()
    with torch.no_grad():
        translation = translate_split(
            network, inferer, dataloader, modalities, condition_modalities, settings.evaluate_batch_size, device
        )
    results = {"checkpoint": str(ckpt_path), "translation": translation}
    lines = [f"# Evaluation of {ckpt_path}", "", *translation_markdown(translation, modalities, type(network).__name__)]
    write_metrics(settings, results, lines)
    return results


def write_metrics(settings: EvaluationSettings, results: dict, lines: Sequence[str]) -> None:
    """Writes ``results`` to ``metrics.json`` and ``lines`` to ``metrics.md`` in ``settings.output_dir``."""
    outputs = settings.outputs
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    outputs[0].write_text(json.dumps(results, indent=1))
    outputs[1].write_text("\n".join(lines) + "\n")
    logger.info("wrote %s and %s", *outputs)
