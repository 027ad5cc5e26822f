"""Translation inference: a trained translation model generates the modalities a study lacks from those it has.
``inference.json`` runs it (:class:`TranslationWorkflow`, chosen by the model's record) as a MONAI
``SupervisedEvaluator`` over the studies (:func:`input_cases`), puts each output on its input's grid
(:class:`OntoInputGridd`, also MONAI Label's postprocessing) and writes it (:class:`TranslationWriter`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.engines import default_prepare_batch
from monai.transforms import Compose, CopyItemsd, MapTransform

from .data.discovery import discover_cases
from .data.preflight import preflight
from .data.transforms import preprocessing
from .errors import BadInputError
from .outputs import onto_grid, refuse_earlier_outputs, write_volumes
from .run_record import TrainedModel
from .settings import InferenceSettings
from .utils import check_output_folder

__all__ = ["OntoInputGridd", "TranslationWorkflow", "TranslationWriter", "input_cases"]

logger = logging.getLogger(__name__)


class OntoInputGridd(MapTransform):
    """Puts each key's volume (C, *S), made on the preprocessed grid of ``data[source_key]`` (a MetaTensor whose meta
    has the file's ``original_affine`` and ``spatial_shape``, as ``LoadImage`` records them), onto the grid and affine
    of that input's file: resampled by the affines (:func:`~bundle.outputs.onto_grid`), zero outside the
    preprocessed box. The translation config's postprocessing (MONAI Label's too): the output overlays the input."""

    def __init__(self, keys: KeysCollection = "pred", source_key: str = "image") -> None:
        super().__init__(keys)
        self.source_key = source_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        source = d[self.source_key]
        target = torch.as_tensor(np.asarray(source.meta["original_affine"], dtype=float))
        shape = [int(s) for s in source.meta["spatial_shape"]]
        for key in self.key_iterator(d):
            volume = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            d[key] = MetaTensor(onto_grid(volume, source.affine, target, shape), affine=target)
        return d


def input_cases(
    dataset_dir: str | Path | None,
    input_files: Mapping[str, str] | None,
    condition_modalities: Sequence[str],
    skip_invalid: bool = False,
) -> list[dict]:
    """The case records to translate: the one case of ``input_files`` (``{modality: path}``, every given modality;
    its id is the first file's name less the modality suffix and the extension), else every case below
    ``dataset_dir`` that has the given modalities (:func:`~bundle.data.discover_cases`: BraTS layout, Decathlon,
    datalist), each checked by :func:`~bundle.data.preflight` (a missing or unreadable file names its case; with
    ``skip_invalid`` such cases are left out with a warning).

    Raises:
        BadInputError: for ``input_files`` that miss a given modality or name one the model is not given.
    """
    if input_files:
        if not isinstance(input_files, Mapping) or set(input_files) != set(condition_modalities):
            raise BadInputError(
                f"input_files must give one file for each of the model's given modalities {list(condition_modalities)}"
                f", e.g. \"{{'{condition_modalities[0]}': 'path/to/case_{condition_modalities[0]}.nii.gz'}}\"; got "
                f"{input_files!r}."
            )
        first = Path(str(input_files[condition_modalities[0]]))
        name = first.name.split(".")[0]
        suffix = f"_{condition_modalities[0]}"
        case = name[: -len(suffix)] if name.lower().endswith(suffix) and len(name) > len(suffix) else name
        records = [
            {
                "case": case,
                "channels": {m: None for m in condition_modalities},
                **{m: str(input_files[m]) for m in condition_modalities},
            }
        ]
    else:
        records = discover_cases(dataset_dir, condition_modalities)
    return preflight(records, condition_modalities, skip_invalid, purpose="translate")


class TranslationWriter:
    """The translation evaluator's writer (an Ignite handler): for each case of ``cases`` (their ``case`` ids),
    ``<case>_<modality>.nii.gz`` of the ``model``'s generated modalities, from each output's ``pred`` (on the grid
    and affine of the case's given file, :class:`OntoInputGridd`; values in [0, 1]), and ``<case>.png``, the
    mid-slices of the given and the generated volumes on the model's grid (``image`` and ``preview``).

    The output files of every case are checked when it is built, before any work: existing ones are refused unless
    ``overwrite`` (nothing is written then).

    Raises:
        BadInputError: for an ``output_dir`` that cannot be a folder, or existing outputs without ``overwrite``.
    """

    def __init__(self, cases: Sequence[Mapping], model: TrainedModel, output_dir: str | Path, overwrite: bool) -> None:
        self.model, self.output_dir = model, Path(output_dir)
        check_output_folder(self.output_dir, "output_dir")
        self.paths = {
            r["case"]: {m: self.output_dir / f"{r['case']}_{m}.nii.gz" for m in model.modalities}
            | {"png": self.output_dir / f"{r['case']}.png"}
            for r in cases
        }
        if not overwrite:
            refuse_earlier_outputs(
                [p for entry in self.paths.values() for p in entry.values() if p.exists()], self.output_dir
            )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.output_dir.mkdir(parents=True, exist_ok=True))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)

    def write(self, engine: Engine) -> None:
        given, generated = self.model.condition_modalities, self.model.modalities
        for item, output in zip(engine.state.batch, engine.state.output, strict=True):
            case, written = item["case"], output["pred"]
            preview = torch.cat([torch.as_tensor(output["image"]).cpu(), torch.as_tensor(output["preview"]).cpu()])
            write_volumes(written, written.affine, self.paths[case], preview, [*given, *generated])
            logger.info(
                "%s: wrote %s (%s voxels) from %s",
                case,
                ", ".join(p.name for p in self.paths[case].values()),
                "×".join(map(str, written.shape[1:])),
                ", ".join(given),
            )


class TranslationWorkflow:
    """The parts of ``inference.json``'s evaluator for a model given modalities: the studies to translate
    (``dataset``: :attr:`cases`, each read onto the model's grid by :func:`~bundle.data.preprocessing`), batches as
    (given modalities, None) (``prepare_batch``), each output copied as ``preview`` and put on its input file's grid
    (``postprocessing``, :class:`OntoInputGridd`) and the :class:`TranslationWriter` (``handlers``). ``preprocessing``
    is what MONAI Label applies to the one given image it is sent (``image``). The studies and the earlier outputs
    are checked when ``dataset`` and ``handlers`` are first asked for (``inference.json``'s ``initialize``).

    Raises:
        BadInputError: for input files that do not give the model's given modalities, a study that cannot be read
            (unless ``settings.skip_invalid``), and earlier outputs without ``settings.overwrite``.
    """

    def __init__(self, model: TrainedModel, settings: InferenceSettings) -> None:
        self.model, self.settings = model, settings
        self.preprocessing = preprocessing(["image"], model.spatial_size, model.spacing)
        self.prepare_batch: Callable = default_prepare_batch
        self.postprocessing = Compose(
            [CopyItemsd(keys="pred", names="preview"), OntoInputGridd(keys="pred", source_key="image")]
        )

    @cached_property
    def cases(self) -> list[dict]:
        """The studies' case records (:func:`input_cases`), read when first asked for (MONAI Label, which sends its
        own image, never asks)."""
        given, settings = self.model.condition_modalities, self.settings
        return input_cases(settings.dataset_dir, settings.input_files, given, settings.skip_invalid)

    @cached_property
    def dataset(self) -> Dataset:
        return Dataset(
            self.cases,
            transform=preprocessing(self.model.condition_modalities, self.model.spatial_size, self.model.spacing),
        )

    @cached_property
    def handlers(self) -> list[TranslationWriter]:
        return [TranslationWriter(self.cases, self.model, self.settings.output_dir, self.settings.overwrite)]
