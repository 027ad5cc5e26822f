"""Generation: a trained model → N synthetic volumes, one NIfTI per modality plus a mid-slice PNG per sample, on the
training grid or, for a registered dataset trained on its native grid, on the dataset's own grid. ``inference.json``
runs it as a MONAI ``SupervisedEvaluator`` over the sample indices (:class:`NoiseShape` gives the sampler its shape,
:class:`SampleWriter` writes what it returns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from .outputs import write_volumes
from .run_record import TrainedModel
from .settings import InferenceSettings

__all__ = ["NoiseShape", "SampleWriter", "onto_grid", "to_original_grid"]

logger = logging.getLogger(__name__)


def onto_grid(
    sample: torch.Tensor, affine: torch.Tensor | np.ndarray, target_affine: np.ndarray, spatial_size: Sequence[int]
) -> torch.Tensor:
    """``sample`` (C, *S) on the grid of ``affine`` resampled (trilinear, by the affines: the same world points)
    onto the grid of ``target_affine`` and ``spatial_size``; zero outside the sample's box."""
    return SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=True)(
        MetaTensor(sample, affine=torch.as_tensor(affine, dtype=torch.float64)),
        dst_affine=torch.as_tensor(target_affine, dtype=torch.float64),
        spatial_size=list(spatial_size),
    ).as_tensor()


def to_original_grid(sample: torch.Tensor, run_record: dict) -> tuple[torch.Tensor, np.ndarray]:
    """``sample`` (C, *S) on the training grid (``run_record["affine"]``) → (the sample on the dataset's own grid,
    its affine): resampled (trilinear) onto ``run_record["original_grid"]`` where the run record has one (a registered
    dataset on the native grid, :func:`~bundle.run_record.run_record`), zero outside the training box; else
    ``sample`` and the training grid's affine."""
    affine = np.asarray(run_record["affine"], dtype=float)
    grid = run_record.get("original_grid")
    if grid is None:
        return sample, affine
    target = np.asarray(grid["affine"], dtype=float)
    return onto_grid(sample, affine, target, grid["spatial_size"]), target


class NoiseShape:
    """The ``prepare_batch`` of a generation evaluator: a batch of sample records → (zeros (B, *shape), None), the
    shape reference that :class:`~bundle.diffusion.DiffusionSampler` draws x_T for."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, None]:
        return torch.zeros((len(batchdata["sample"]), *self.shape), device=device), None


class SampleWriter:
    """The generation evaluator's writer (an Ignite handler). When the run starts, with ``settings.overwrite``, it
    removes every sample file of an earlier run in ``settings.output_dir`` (the checkpoint has loaded by then: the
    network was built with it), so that none is left beside this run's samples or taken for one of them (also when
    this run has fewer samples, or is stopped part-way). After each iteration it writes each sample ``pred``
    (C, *S) in [0, 1] as :meth:`~bundle.settings.InferenceSettings.sample_paths` names it
    (:func:`~bundle.outputs.write_volumes`): on the dataset's own grid where the ``model``'s record has one, else on
    the training grid (:func:`to_original_grid`)."""

    def __init__(self, settings: InferenceSettings, model: TrainedModel) -> None:
        self.settings, self.model = settings, model
        self.paths = settings.sample_paths(model.modalities)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        output_dir = self.settings.output_dir
        earlier = self.settings.earlier_samples()
        for path in earlier:
            path.unlink()
        if earlier:
            logger.warning(
                "--overwrite true: removed %d sample files of an earlier run from %s.", len(earlier), output_dir
            )
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        grid = self.model.record.get("original_grid")
        if grid is not None:
            logger.info(
                "samples are written on the dataset's grid (%s voxels), the training box padded back",
                "×".join(map(str, grid["spatial_size"])),
            )

    def write(self, engine: Engine) -> None:
        indices = []
        for item, output in zip(engine.state.batch, engine.state.output, strict=True):
            index = int(item["sample"])
            sample = torch.as_tensor(output["pred"]).detach().cpu()
            written, affine = to_original_grid(sample, self.model.record)
            write_volumes(written, affine, self.paths[index], sample, self.model.modalities)
            indices.append(index)
        logger.info(
            "wrote samples %d–%d of %d to %s",
            indices[0],
            indices[-1],
            self.settings.num_samples,
            self.settings.output_dir,
        )
