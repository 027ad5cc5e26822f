"""What a MONAI Label server needs to serve a translation model (the app in ``scripts/monailabel_app``): the given
files of the case a request names (:func:`case_files`) and the request's sampling options, checked
(:func:`request_options`). Kept apart from MONAI Label, which lives in its own environment, so that the bundle's
tests check them without it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .data import BRATS_MODALITIES
from .data.discovery import image_stem
from .diffusion import SAMPLERS
from .errors import BadInputError
from .run_record import TrainedModel

__all__ = ["case_files", "request_options"]


def _split_name(path: Path, modalities: Sequence[str]) -> tuple[str, str] | None:
    """(``<case>_``, suffix) of a file named ``<case>_<modality><suffix>`` (``-`` also), else None."""
    stem = image_stem(path.name)
    pattern = rf"(?P<case>.+[_-])(?:{'|'.join(map(re.escape, modalities))})"
    match = re.fullmatch(pattern, stem, flags=re.IGNORECASE) if stem else None
    return (match["case"], path.name[len(stem) :]) if match else None


def _sibling(path: Path, name: str) -> Path:
    """The file ``name`` beside ``path``, its letters' case as found there (``sub-1_T1.nii`` for ``sub-1_t1.nii``)."""
    if (path.parent / name).is_file() or not path.parent.is_dir():
        return path.parent / name
    return next((p for p in path.parent.iterdir() if p.name.lower() == name.lower()), path.parent / name)


def case_files(image: str | Path, model: TrainedModel) -> dict[str, str]:
    """``{given modality: path}`` of the case whose file ``image`` is: a study's file named
    ``<case>_<modality>.nii.gz`` (BraTS's naming, ``-`` also; any of the case's modalities), and each given modality
    of ``model`` read from beside it, ``<case>_<given>`` with the same extension (letters in either case). The
    output is put on the grid of the first given modality's file.

    Raises:
        BadInputError: for an empty ``image`` (a request with no image of the studies), a name without a modality
            suffix, and a given modality's file missing beside it, each naming the file and the naming expected.
    """
    given = model.condition_modalities
    if not given:
        raise BadInputError(f"{model.path} is a generation model; a MONAI Label request serves translation models.")
    if not str(image):
        raise BadInputError("The request names no image of the studies: pass image=<an image id the server lists>.")
    path = Path(image)
    known = list(dict.fromkeys([*given, *model.modalities, *BRATS_MODALITIES]))
    parts = _split_name(path, known)
    if parts is None:
        raise BadInputError(
            f"{path.name}: the model translates {', '.join(given)} → {', '.join(model.modalities)} and finds a case's "
            f"{', '.join(given)} by its file name, <case>_<modality>.nii.gz (BraTS's naming); this name ends in none "
            f"of {known}. Name the study's files so, e.g. patient01_{given[0]}.nii.gz, and name one by its image id "
            "(an uploaded file loses its name)."
        )
    case, suffix = parts
    files = {m: _sibling(path, f"{case}{m}{suffix}") for m in given}
    missing = [f"{m}: {p.name}" for m, p in files.items() if not p.is_file()]
    if missing:
        raise BadInputError(
            f"The case of {path.name} has no {', '.join(missing)} beside it in {path.parent}; the model is given "
            f"{', '.join(given)} and generates {', '.join(model.modalities)} from them."
        )
    return {m: str(p) for m, p in files.items()}


def _first(value: object) -> object:
    """A MONAI Label option's value: its first entry when the app's default (a list, shown as a drop-down) is sent."""
    return value[0] if isinstance(value, list | tuple) and value else value


def request_options(request: Mapping, model: TrainedModel) -> tuple[dict, int]:
    """The request's sampling settings as ``inference.json`` overrides (``sampler``, ``num_inference_steps``,
    ``eta``, ``seed``; absent ones keep the config's), and the output channel of ``modality`` (one of the model's
    generated modalities; default the first). A list stands for its first entry (MONAI Label sends an option's
    default as the app declared it).

    Raises:
        BadInputError: for a sampler the model's objective has not, a number of steps outside [1, T], a negative
            ``eta``, a seed that is not an integer and a modality the model does not generate, each naming what
            would be accepted.
    """
    overrides: dict = {}
    samplers = sorted(SAMPLERS[model.objective])
    sampler = _first(request.get("sampler"))
    if sampler not in (None, ""):
        if sampler not in samplers:
            raise BadInputError(f"sampler={sampler!r}: this model samples with one of {samplers}.")
        overrides["sampler"] = sampler
    for name, low, high in (("num_inference_steps", 1, model.num_train_timesteps), ("seed", 0, 2**63 - 1)):
        value = _first(request.get(name))
        if value in (None, ""):
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or str(number) != str(value).strip() or not low <= number <= high:
            raise BadInputError(f"{name}={value!r}: give a whole number in [{low}, {high}].")
        overrides[name] = number
    eta = _first(request.get("eta"))
    if eta not in (None, ""):
        try:
            overrides["eta"] = float(eta)
        except (TypeError, ValueError):
            overrides["eta"] = -1.0
        if not overrides["eta"] >= 0:
            raise BadInputError(f"eta={eta!r}: give a number ≥ 0 (0: deterministic DDIM; 1: DDPM-like).")
    modality = _first(request.get("modality")) or model.modalities[0]
    if modality not in model.modalities:
        raise BadInputError(f"modality={modality!r}: the model generates {model.modalities}.")
    return overrides, model.modalities.index(modality)
