"""The memorization audit (``configs/audit.json``): is a generated volume a copy of a training patient?

Every sample in ``samples_dir`` (as inference writes them: one NIfTI per generated modality, ``<name>_<modality>``)
is brought onto the training grid and compared with every training case of the run's recorded split by
:func:`~bundle.audit.nearest_cases`; the held-out (validation) cases are compared the same way and set the threshold
(:func:`~bundle.audit.copy_threshold`: nearer than any new patient came). Writes ``audit.json`` (per sample: its
nearest training case, the similarity, ``flagged``; the threshold and its rule), ``audit.md`` and ``audit_pairs.png``
(the closest sample/training pairs side by side).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import torch

from .audit import copy_threshold, nearest_cases
from .errors import BadInputError
from .outputs import onto_grid, writing_grid
from .run_record import TrainedModel
from .visualize import mid_slices

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["AUDIT_FILES", "audit", "case_volumes", "check_recorded_split", "sample_volumes"]

logger = logging.getLogger(__name__)

AUDIT_FILES = ("audit.json", "audit.md", "audit_pairs.png")
THRESHOLD_RULE = (
    "the largest nearest-training similarity of the held-out (validation) cases: a sample is flagged when it is "
    "nearer a training case than any new patient came (compared to 4 decimals)"
)


def sample_volumes(samples_dir: str | Path, modalities: Sequence[str], record: dict) -> tuple[list[str], torch.Tensor]:
    """``(names, volumes (N, len(modalities), *training grid))`` of the samples in ``samples_dir``: each name's
    ``<name>_<modality>.nii.gz`` for every modality, checked to be on the grid inference writes this run's samples on,
    then resampled onto the training grid (the inverse of inference's padding onto the dataset's grid).

    Raises:
        BadInputError: naming the folder or the file: no samples, a sample without one of ``modalities``, or a file on
            another grid.
    """
    folder = Path(samples_dir)
    pattern = re.compile(rf"(?P<name>.+)_(?P<modality>{'|'.join(map(re.escape, modalities))})\.nii\.gz")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match:
            found.setdefault(match["name"], {})[match["modality"]] = path
    if not found:
        raise BadInputError(
            f"samples_dir {str(folder)!r} holds no samples: expected files such as sample_000_{modalities[0]}.nii.gz, "
            "one per generated modality, as configs/inference.json writes them."
        )
    for name, files in found.items():
        missing = [m for m in modalities if m not in files]
        if missing:
            raise BadInputError(
                f"Sample {name!r} in {str(folder)!r} lacks {missing}: the model generates {list(modalities)}, and "
                f"each sample is audited over all of them; add {name}_{missing[0]}.nii.gz or remove the sample's files."
            )
    affine, shape = writing_grid(record)
    volumes = []
    for files in found.values():
        channels = []
        for modality in modalities:
            image = nib.load(files[modality])
            if list(image.shape) != shape or not np.allclose(image.affine, affine, atol=1e-3):
                raise BadInputError(
                    f"{files[modality]} is on another grid ({list(image.shape)} voxels) than the samples of this model "
                    f"({shape} voxels, the affine of its run.json): audit the samples of the model given by "
                    "--ckpt_path, as inference wrote them."
                )
            channels.append(torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32)))
        volumes.append(onto_grid(torch.stack(channels), affine, np.asarray(record["affine"]), record["spatial_size"]))
    return list(found), torch.stack(volumes).clamp(0, 1)


def _above(similarity: torch.Tensor | float, threshold: float) -> bool:
    """Whether ``similarity`` exceeds ``threshold`` as both are reported, to 4 decimals: a held-out volume written
    to a file and read back is not flagged for its rounding."""
    return round(float(similarity), 4) > round(threshold, 4)


def case_volumes(dataset) -> tuple[list[str], torch.Tensor]:
    """``(case ids, volumes (N, C, *S))`` of a dataset of preprocessed case records."""
    items = [dataset[i] for i in range(len(dataset))]
    return [item["case"] for item in items], torch.stack([torch.as_tensor(item["image"]).float() for item in items])


def _plot_pairs(samples: torch.Tensor, cases: torch.Tensor, labels: Sequence[str], path: Path) -> None:
    """The given sample/training pairs, one row each: the first modality's mid-slices of the sample, then of its
    nearest training case."""
    fig, axes = plt.subplots(len(labels), 6, figsize=(9, 1.7 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for col, image in enumerate(mid_slices(samples[row, 0]) + mid_slices(cases[row, 0])):
            axes[row][col].imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row][col].set_axis_off()
        axes[row][0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_recorded_split(model: TrainedModel) -> TrainedModel:
    """Raises :class:`BadInputError` for a model whose run recorded no validation cases: the audit's threshold is
    how near its nearest training case a held-out patient comes. Returns the model."""
    if not model.record.get("validation_cases"):
        raise BadInputError(
            f"{model.path} records no validation cases: the audit's threshold is how near its nearest training case "
            "a held-out patient comes, so it needs a run whose run.json records its split (configs/train.json writes "
            "it)."
        )
    return model


def audit(
    model: TrainedModel,
    samples_dir: str | Path,
    output_dir: str | Path,
    training,
    held_out,
    max_shift: int = 1,
    num_pairs: int = 4,
) -> dict:
    """Audits the samples of ``samples_dir`` against the ``training`` cases (a dataset of the run's preprocessed
    training cases) with the threshold of the ``held_out`` ones, writes :data:`AUDIT_FILES` to ``output_dir`` and
    returns what ``audit.json`` holds. The log says how many samples were flagged; a flagged sample is a finding, not
    an error.

    Raises:
        BadInputError: for a run that recorded no validation cases (the threshold needs them), or samples that
            :func:`sample_volumes` refuses; before anything is written.
    """
    check_recorded_split(model)
    names, samples = sample_volumes(samples_dir, model.modalities, model.record)
    train_ids, train = case_volumes(training)
    held_ids, held = case_volumes(held_out)
    held_similarity, held_nearest = nearest_cases(held, train, max_shift)
    threshold = copy_threshold(held_similarity)
    similarity, nearest = nearest_cases(samples, train, max_shift)
    result = {
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "max_shift": max_shift,
        "num_training_cases": len(train_ids),
        "held_out": [
            {"case": case, "nearest": train_ids[int(i)], "similarity": float(s)}
            for case, i, s in zip(held_ids, held_nearest, held_similarity, strict=True)
        ],
        "samples": [
            {"name": name, "nearest": train_ids[int(i)], "similarity": float(s), "flagged": _above(s, threshold)}
            for name, i, s in zip(names, nearest, similarity, strict=True)
        ],
    }
    flagged = [s for s in result["samples"] if s["flagged"]]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = similarity.argsort(descending=True)[:num_pairs]
    _plot_pairs(
        samples[order],
        train[nearest[order]],
        [f"{names[int(i)]} ~ {train_ids[int(nearest[i])]}: {float(similarity[i]):.3f}" for i in order],
        out / AUDIT_FILES[2],
    )
    (out / AUDIT_FILES[0]).write_text(json.dumps(result, indent=1))
    (out / AUDIT_FILES[1]).write_text(_markdown(result, len(flagged)))
    logger.info(
        "audit: %d of %d samples flagged as near-copies of a training case (similarity above %.4f, %s); %s",
        len(flagged),
        len(names),
        threshold,
        THRESHOLD_RULE,
        out / AUDIT_FILES[0],
    )
    return result


def _markdown(result: dict, flagged: int) -> str:
    held = [s["similarity"] for s in result["held_out"]]
    rows = "\n".join(
        f"| {s['name']} | {s['nearest']} | {s['similarity']:.4f} | {'**yes**' if s['flagged'] else 'no'} |"
        for s in sorted(result["samples"], key=lambda s: -s["similarity"])
    )
    return "\n".join(
        [
            "# Memorization audit",
            "",
            f"**{flagged} of {len(result['samples'])} samples flagged** as near-copies of a training case.",
            "",
            (
                "Similarity: the correlation of the two volumes inside the head over every modality, each "
                f"standardised, the largest over shifts of up to {result['max_shift']} voxel(s) per axis (1: a "
                f"copy). Threshold {result['threshold']:.4f}: {result['threshold_rule']} ({len(held)} held-out "
                f"cases, nearest-training similarity {min(held):.4f}–{max(held):.4f}; "
                f"{result['num_training_cases']} training cases)."
            ),
            "",
            f"![the closest sample/training pairs: sample, then its nearest training case]({AUDIT_FILES[2]})",
            "",
            "| sample | nearest training case | similarity | flagged |",
            "|---|---|---|---|",
            rows,
            "",
        ]
    )
