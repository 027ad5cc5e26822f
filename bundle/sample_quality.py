"""Do generated volumes look like the real ones? Distribution measures that need no downloaded weights, each
reported as a distance between the generated and the real set beside the same distance between two halves of the
real set (the real-vs-real spread: the yardstick of "as close as two samples of the data are to each other").

The measures, for volumes (N, C, *S) with intensities in [0, 1]:

* ``histogram/<modality>``: Wasserstein-1 distance between the two sets' pooled voxel intensities (in intensity
  units: how far, on average, a voxel's intensity must move to turn one histogram into the other);
* ``autocorrelation/<modality>``: difference of the mean lag-1 spatial autocorrelation (the Pearson correlation of
  each voxel with its neighbour, averaged over the axes): about 1 for smooth anatomy, about 0 for voxel noise;
* ``power_spectrum/<modality>``: mean absolute difference of the radially averaged log₁₀ power spectra (texture
  and sharpness at every spatial frequency);
* ``foreground/<modality>``: difference of the mean foreground (head) volume fraction, voxels above
  ``threshold``;
* ``correlation/<a>_<b>`` and ``joint_histogram/<a>_<b>`` for each pair of modalities: difference of the mean
  voxel-wise Pearson correlation of the two modalities inside the foreground, and the total-variation distance
  between their pooled joint intensity histograms (T1/T2 contrast: e.g. CSF dark in T1 and bright in T2);
* ``mmd``: MONAI's ``MMDMetric`` per voxel (:func:`normalised_mmd`);
* ``diversity``: difference of the mean pairwise MS-SSIM within each set (a set of copies of one volume has 1).

:func:`compare_to_real` draws ``num_splits`` random pairs of disjoint halves of the real set; a measure is *within
the spread* when its generated-vs-real distance (averaged over the splits) is at most the largest real-vs-real
distance over the splits. :func:`distance_ratio` sums the measures up as one continuous number (each distance over
that largest real-vs-real one, geometric mean): it moves where the fraction within the spread stands still.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric

__all__ = [
    "FOREGROUND_THRESHOLD",
    "compare_to_real",
    "distance_ratio",
    "mean_pairwise",
    "ms_ssim_settings",
    "normalised_mmd",
    "pairwise_ms_ssim",
    "quality_summary",
    "volume_statistics",
]

FOREGROUND_THRESHOLD = 0.1  # in [0, 1] intensities: the phantoms' and skull-stripped scans' background is 0
HISTOGRAM_QUANTILES = 256
JOINT_BINS = 16


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


def _autocorrelation(volumes: torch.Tensor) -> torch.Tensor:
    """(N, C) lag-1 autocorrelation, the mean over the spatial axes of corr(x, x shifted by one voxel)."""
    per_axis = []
    for axis in range(2, volumes.ndim):
        n = volumes.shape[axis]
        a = volumes.narrow(axis, 0, n - 1).flatten(2)
        b = volumes.narrow(axis, 1, n - 1).flatten(2)
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        per_axis.append((a * b).sum(-1) / ((a.square().sum(-1) * b.square().sum(-1)).sqrt() + 1e-12))
    return torch.stack(per_axis).mean(0)


def _radial_log_spectrum(volumes: torch.Tensor) -> torch.Tensor:
    """(N, C, R) log₁₀ of the power spectrum of the mean-free volumes, averaged over shells of radius 1 … R
    (R = half the smallest side) in cycles per volume side, the DC term left out."""
    spatial = volumes.shape[2:]
    power = (
        torch.fft.fftn(
            volumes - volumes.mean(dim=tuple(range(2, volumes.ndim)), keepdim=True), dim=tuple(range(2, volumes.ndim))
        )
        .abs()
        .square()
    )
    grids = torch.meshgrid(*[torch.fft.fftfreq(n) * min(spatial) for n in spatial], indexing="ij")
    shell = torch.stack(grids).square().sum(0).sqrt().round().long().flatten()
    count = min(spatial) // 2
    keep = (shell >= 1) & (shell <= count)
    flat = power.flatten(2)[..., keep]
    sums = torch.zeros((*flat.shape[:2], count + 1), dtype=flat.dtype).index_add_(2, shell[keep], flat)
    sizes = torch.bincount(shell[keep], minlength=count + 1).clamp(min=1)
    return (sums[..., 1:] / sizes[1:] + 1e-12).log10()


def _pair_correlation(volumes: torch.Tensor, a: int, b: int, threshold: float) -> torch.Tensor:
    """(N,) Pearson correlation of channels ``a`` and ``b`` over the voxels where either is foreground."""
    values = []
    for volume in volumes:
        x, y = volume[a].flatten(), volume[b].flatten()
        inside = (x > threshold) | (y > threshold)
        x, y = x[inside] - x[inside].mean(), y[inside] - y[inside].mean()
        values.append(
            (x * y).sum() / ((x.square().sum() * y.square().sum()).sqrt() + 1e-12)
            if inside.sum() > 1
            else torch.tensor(0.0)
        )
    return torch.stack(values)


def volume_statistics(volumes: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> dict[str, torch.Tensor]:
    """Per-volume statistics of (N, C, *S) volumes in [0, 1]: ``mean`` (N, C), ``foreground`` (N, C),
    ``autocorrelation`` (N, C), ``spectrum`` (N, C, R) and, with two or more channels, ``correlation`` (N, P)
    for the P channel pairs in :func:`itertools.combinations` order."""
    volumes = volumes.detach().float().cpu()
    statistics = {
        "mean": volumes.flatten(2).mean(-1),
        "foreground": (volumes > threshold).flatten(2).float().mean(-1),
        "autocorrelation": _autocorrelation(volumes),
        "spectrum": _radial_log_spectrum(volumes),
    }
    pairs = list(itertools.combinations(range(volumes.shape[1]), 2))
    if pairs:
        statistics["correlation"] = torch.stack([_pair_correlation(volumes, a, b, threshold) for a, b in pairs], 1)
    return statistics


def _wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wasserstein-1 distance between the value distributions of ``a`` and ``b`` (any shapes), from quantiles."""
    levels = (torch.arange(HISTOGRAM_QUANTILES, dtype=torch.float64) + 0.5) / HISTOGRAM_QUANTILES

    def quantiles(values: torch.Tensor) -> torch.Tensor:
        ordered = values.flatten().double().sort().values
        return ordered[(levels * len(ordered)).long().clamp(max=len(ordered) - 1)]

    return (quantiles(a) - quantiles(b)).abs().mean().item()


def _joint_histogram(volumes: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Normalised joint histogram (JOINT_BINS × JOINT_BINS) of channels ``a`` and ``b`` over all voxels."""
    x = (volumes[:, a].flatten().clamp(0, 1) * (JOINT_BINS - 1e-6)).long()
    y = (volumes[:, b].flatten().clamp(0, 1) * (JOINT_BINS - 1e-6)).long()
    counts = torch.bincount(x * JOINT_BINS + y, minlength=JOINT_BINS**2).double()
    return counts / counts.sum()


def pairwise_ms_ssim(volumes: torch.Tensor) -> torch.Tensor:
    """(N, N) MS-SSIM between every two of ``volumes`` (N, C, *S), the mean over channels; 1 on the diagonal."""
    metric = MultiScaleSSIMMetric(spatial_dims=volumes.ndim - 2, data_range=1.0, **ms_ssim_settings(volumes.shape[2:]))
    matrix = torch.eye(len(volumes))
    for i, j in itertools.combinations(range(len(volumes)), 2):
        matrix[i, j] = matrix[j, i] = metric(volumes[i : i + 1], volumes[j : j + 1]).mean().item()
    return matrix


def mean_pairwise(matrix: torch.Tensor) -> float:
    """The mean of the off-diagonal entries of a (N, N) :func:`pairwise_ms_ssim` matrix (N ≥ 2): a set's diversity,
    1 for copies of one volume, lower for a more diverse set."""
    n = len(matrix)
    return ((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1))).item()


def _distances(
    a: torch.Tensor, b: torch.Tensor, stats_a: dict, stats_b: dict, modalities: Sequence[str]
) -> dict[str, float]:
    """Every measure's distance between the sets ``a`` and ``b`` (N, C, *S), given their volume statistics."""
    distances = {}
    for c, modality in enumerate(modalities):
        distances[f"histogram/{modality}"] = _wasserstein(a[:, c], b[:, c])
        for name in ("autocorrelation", "foreground"):
            distances[f"{name}/{modality}"] = abs(stats_a[name][:, c].mean() - stats_b[name][:, c].mean()).item()
        spectra = stats_a["spectrum"][:, c].mean(0) - stats_b["spectrum"][:, c].mean(0)
        distances[f"power_spectrum/{modality}"] = spectra.abs().mean().item()
    for p, (i, j) in enumerate(itertools.combinations(range(len(modalities)), 2)):
        pair = f"{modalities[i]}_{modalities[j]}"
        distances[f"correlation/{pair}"] = abs(
            stats_a["correlation"][:, p].mean() - stats_b["correlation"][:, p].mean()
        ).item()
        distances[f"joint_histogram/{pair}"] = (
            0.5 * (_joint_histogram(a, i, j) - _joint_histogram(b, i, j)).abs().sum().item()
        )
    distances["mmd"] = normalised_mmd(a, b)[0]
    distances["diversity"] = abs(mean_pairwise(stats_a["ms_ssim"]) - mean_pairwise(stats_b["ms_ssim"]))
    return distances


def _subset(statistics: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of the volumes ``index`` of a set (of ``ms_ssim``, their rows and columns)."""
    return {
        name: values[index][:, index] if name == "ms_ssim" else values[index] for name, values in statistics.items()
    }


def compare_to_real(
    generated: torch.Tensor,
    real: torch.Tensor,
    modalities: Sequence[str],
    num_splits: int = 10,
    seed: int = 0,
    threshold: float = FOREGROUND_THRESHOLD,
) -> dict:
    """Each measure of the module docstring between ``generated`` and ``real``, beside the real-vs-real spread.

    For each of ``num_splits`` random splits, two disjoint halves R₁, R₂ of ``n = min(len(generated), len(real) // 2)``
    real volumes each are drawn, and ``n`` of the generated volumes G (all of them when there are n); the split gives
    d(R₁, R₂) and d(G, R₂). Splits come from a generator seeded with ``seed``, so a rerun repeats them.

    Args:
        generated: (M, C, *S) generated volumes in [0, 1].
        real: (N, C, *S) real volumes in [0, 1], the reference (e.g. the validation split).
        modalities: the names of the C channels.
        num_splits: random splits to average over.
        seed: seed of the splits.
        threshold: the foreground intensity.

    Returns:
        ``{"num_generated", "num_real", "set_size", "num_splits", "measures": {name: {"generated_vs_real",
        "real_vs_real_mean", "real_vs_real_max", "within_spread"}}, "statistics": {name: {"generated", "real"}},
        "within_spread": fraction of the measures within the spread, "distance_ratio": :func:`distance_ratio` of
        the measures}``; ``statistics`` holds the set means of the
        interpretable per-volume statistics (mean intensity, foreground fraction, autocorrelation per modality,
        correlation per pair).

    Raises:
        ValueError: for channels that do not match ``modalities``, fewer than 2 generated or 4 real volumes (two
            halves of two), or non-finite values.
    """
    if generated.shape[1:] != real.shape[1:] or real.shape[1] != len(modalities):
        raise ValueError(
            f"generated {tuple(generated.shape)} and real {tuple(real.shape)} volumes must share their "
            f"shape (N, C, *S) with C = {len(modalities)} modalities {list(modalities)}."
        )
    for name, volumes in (("generated", generated), ("real", real)):
        if not torch.isfinite(volumes).all():
            raise ValueError(f"The {name} volumes hold non-finite values (NaN or ±inf): nothing to compare.")
    n = min(len(generated), len(real) // 2)
    if n < 2:
        raise ValueError(
            f"Comparing with the real-vs-real spread needs at least 2 generated and 4 real volumes, got "
            f"{len(generated)} and {len(real)}."
        )
    generated, real = generated.detach().float().cpu().clamp(0, 1), real.detach().float().cpu().clamp(0, 1)
    stats_g, stats_r = volume_statistics(generated, threshold), volume_statistics(real, threshold)
    stats_g["ms_ssim"], stats_r["ms_ssim"] = pairwise_ms_ssim(generated), pairwise_ms_ssim(real)
    rng = torch.Generator().manual_seed(seed)
    gen_vs_real, real_vs_real = [], []
    for _ in range(num_splits):
        order = torch.randperm(len(real), generator=rng)
        first, second = order[:n], order[n : 2 * n]
        chosen = torch.randperm(len(generated), generator=rng)[:n]
        r2, s2 = real[second], _subset(stats_r, second)
        real_vs_real.append(_distances(real[first], r2, _subset(stats_r, first), s2, modalities))
        gen_vs_real.append(_distances(generated[chosen], r2, _subset(stats_g, chosen), s2, modalities))
    measures = {}
    for name in gen_vs_real[0]:
        g = sum(d[name] for d in gen_vs_real) / num_splits
        r = [d[name] for d in real_vs_real]
        measures[name] = {
            "generated_vs_real": g,
            "real_vs_real_mean": sum(r) / num_splits,
            "real_vs_real_max": max(r),
            "within_spread": g <= max(r),
        }
    statistics = {}
    for c, modality in enumerate(modalities):
        for name in ("mean", "foreground", "autocorrelation"):
            statistics[f"{name}/{modality}"] = {
                "generated": stats_g[name][:, c].mean().item(),
                "real": stats_r[name][:, c].mean().item(),
            }
    for p, (i, j) in enumerate(itertools.combinations(range(len(modalities)), 2)):
        statistics[f"correlation/{modalities[i]}_{modalities[j]}"] = {
            "generated": stats_g["correlation"][:, p].mean().item(),
            "real": stats_r["correlation"][:, p].mean().item(),
        }
    return {
        "num_generated": len(generated),
        "num_real": len(real),
        "set_size": n,
        "num_splits": num_splits,
        "measures": measures,
        "statistics": statistics,
        "within_spread": sum(m["within_spread"] for m in measures.values()) / len(measures),
        "distance_ratio": distance_ratio(measures),
    }


RATIO_FLOOR = 0.01  # a measure's ratio counts as at least this: one measure far inside the spread (MMD can be
# 0 or below) must not outweigh the others in the geometric mean


def distance_ratio(measures: Mapping[str, Mapping[str, float]]) -> float:
    """The geometric mean over ``measures`` (``{name: {"generated_vs_real", "real_vs_real_max"}}``, as
    :func:`compare_to_real` gives them) of each distance divided by its largest real-vs-real distance, each ratio
    at least :data:`RATIO_FLOOR`: 1 on the spread's edge on the whole, below 1 within it; lower is better."""
    if not measures:
        raise ValueError("distance_ratio needs at least one measure.")
    logs = [
        math.log(max(m["generated_vs_real"] / max(m["real_vs_real_max"], 1e-12), RATIO_FLOOR))
        for m in measures.values()
    ]
    return math.exp(sum(logs) / len(logs))


def quality_summary(comparison: dict) -> str:
    """One line of a :func:`compare_to_real` result: the measures within the spread, the distance ratio, and the
    measures outside."""
    outside = [name for name, m in comparison["measures"].items() if not m["within_spread"]]
    total = len(comparison["measures"])
    return (
        f"{total - len(outside)}/{total} measures within the real-vs-real spread, distance ratio "
        f"{comparison['distance_ratio']:.2f}" + (f"; outside: {', '.join(outside)}" if outside else "")
    )
