"""Inference: a trained model's own workflow, chosen by the task its record names (:func:`inference_workflow`).
``inference.json`` runs either as a MONAI ``SupervisedEvaluator`` whose dataset, batch preparation, postprocessing and
writer come from the workflow. Generation (:class:`GenerationWorkflow`): N synthetic volumes, one NIfTI per modality
plus a mid-slice PNG per sample, on the training grid or, for a registered dataset trained on its native grid, on the
dataset's own grid. Translation: :class:`~bundle.translation.TranslationWorkflow`."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.transforms import Compose, EnsureTyped, LoadImaged, Orientationd, Resized

from .outputs import refuse_earlier_outputs, to_original_grid, write_volumes
from .run_record import TrainedModel
from .settings import InferenceSettings
from .translation import TranslationWorkflow

__all__ = ["GenerationWorkflow", "NoiseShape", "SampleWriter", "inference_workflow"]

logger = logging.getLogger(__name__)

SAMPLE_FILE = re.compile(r"sample_\d{3,}(?:_.+\.nii\.gz|\.png)")
"""The names of :meth:`SampleWriter.sample_paths`, for any number of samples and any modalities."""


def inference_workflow(model: TrainedModel, settings: InferenceSettings) -> GenerationWorkflow | TranslationWorkflow:
    """The workflow of ``model``'s task (its record's ``task``): :class:`GenerationWorkflow` for a model that generates
    from noise, :class:`~bundle.translation.TranslationWorkflow` for one given modalities."""
    workflows = {"generation": GenerationWorkflow, "translation": TranslationWorkflow}
    return workflows[model.task](model, settings)


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
    """The generation evaluator's writer (an Ignite handler). Sample files of an earlier run in
    ``settings.output_dir`` (:meth:`earlier_samples`, whatever their number and modalities) are refused when it is
    built, before any work, unless ``settings.overwrite``; then, when the run starts, it removes them all (the
    checkpoint has loaded by then: the network was built with it), so that none is left beside this run's samples or
    taken for one of them (also when this run has fewer samples, or is stopped part-way). After each iteration it
    writes each sample ``pred`` (C, *S) in [0, 1] as :meth:`sample_paths` names it
    (:func:`~bundle.outputs.write_volumes`): on the dataset's own grid where the ``model``'s record has one, else on
    the training grid (:func:`~bundle.outputs.to_original_grid`).

    Raises:
        BadInputError: for earlier sample files without ``settings.overwrite``.
    """

    def __init__(self, settings: InferenceSettings, model: TrainedModel) -> None:
        self.settings, self.model = settings, model
        self.paths = self.sample_paths()
        if not settings.overwrite:
            refuse_earlier_outputs(self.earlier_samples(), settings.output_dir)

    def sample_paths(self) -> list[dict[str, Path]]:
        """``[{modality: …/sample_000_<modality>.nii.gz, "png": …/sample_000.png}, …]``, ``num_samples`` of them."""
        out = Path(self.settings.output_dir)
        return [
            {m: out / f"sample_{i:03d}_{m}.nii.gz" for m in self.model.modalities}
            | {"png": out / f"sample_{i:03d}.png"}
            for i in range(self.settings.num_samples)
        ]

    def earlier_samples(self) -> list[Path]:
        """The sample files (named as :meth:`sample_paths` names them, of any run) already in ``output_dir``."""
        out = Path(self.settings.output_dir)
        if not out.is_dir():
            return []
        return sorted(p for p in out.iterdir() if p.is_file() and SAMPLE_FILE.fullmatch(p.name))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        output_dir = self.settings.output_dir
        earlier = self.earlier_samples()
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


class GenerationWorkflow:
    """The parts of ``inference.json``'s evaluator for a model that generates from noise: ``settings.num_samples``
    sample records (``dataset``), each batch of them as the shape the sampler draws x_T for (``prepare_batch``,
    :class:`NoiseShape`), and the :class:`SampleWriter` (``handlers``). ``preprocessing`` is what MONAI Label applies
    to an image it is given (the sample's grid: loaded, RAS, resized to the training grid). The earlier outputs are
    checked when ``handlers`` is first asked for (``inference.json``'s ``initialize``).

    Raises:
        BadInputError: for earlier sample files in the output folder without ``settings.overwrite``.
    """

    def __init__(self, model: TrainedModel, settings: InferenceSettings) -> None:
        self.model, self.settings = model, settings
        self.preprocessing = Compose(
            [
                LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
                Orientationd(keys="image", axcodes="RAS", labels=[["L", "R"], ["P", "A"], ["I", "S"]]),
                Resized(keys="image", spatial_size=model.spatial_size),
                EnsureTyped(keys="image", dtype=torch.float32),
            ]
        )
        self.dataset = Dataset([{"sample": i} for i in range(settings.num_samples)])
        self.prepare_batch: Callable = NoiseShape([len(model.modalities), *model.spatial_size])
        self.postprocessing = Compose([EnsureTyped(keys="pred")])

    @cached_property
    def handlers(self) -> list[SampleWriter]:
        return [SampleWriter(self.settings, self.model)]
