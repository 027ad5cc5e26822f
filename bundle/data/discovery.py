"""One dataset discovery for training, evaluation and inference (docs/architecture.md, "Data").

A *case record* is ``{"case": id, <modality>: path, ..., "channels": {<modality>: index or None}}``:
one path per requested modality (the same 4D file for every modality in the Decathlon layout, with
the channel to take); a datalist's ``validation`` items also carry ``"split": "validation"``, and the cases of
the two registered layouts (BraTS and the Decathlon: one atlas frame, 240×240×155 at 1 mm) carry
``"frame": "atlas"`` (the native grid's box, :class:`~bundle.data.transforms.NativeBoxd`). Where every case of
the dataset has a tumour segmentation (BraTS's ``<case>_seg`` file, a datalist's ``label``) its record also carries
``"seg"``, its path (the synthesis measures inside and outside the tumour read it). Three layouts are found anywhere
below ``dataset_dir``:

* **BraTS2020**: ``<case>/<case>_<modality>.<ext>`` (``BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz``),
  with ``<ext>`` one of .nii.gz, .nii, .nrrd, .mha, .mhd, or ``<case>/<case>_<modality>/`` holding a
  DICOM series.
* **Medical Segmentation Decathlon Task01_BrainTumour**: ``dataset.json`` beside ``imagesTr/`` with 4D
  NIfTI volumes; channel 1 is T1w and 3 is T2w (0 FLAIR, 2 T1gd), read from its ``modality`` map.
* **Datalist JSON** in MONAI's ``load_decathlon_datalist`` format: a ``*.json`` whose ``training`` items
  give one path per modality (``{"t1": "a_t1.nii.gz", "t2": "a_t2.nii.gz"}``) or an ``image`` that is
  a list of per-modality paths in ``modalities`` order, relative to the JSON's folder. A case's id is its
  first modality's file name without suffix and modality (``a``), prefixed with its folder where that name
  is not unique. Items of its ``validation`` list, in the same format, are returned too, marked as such:
  :func:`~bundle.data.dataset.split_cases` takes them as the validation split.

``*.json`` files that are not valid UTF-8 JSON (a truncated download, an editor's backup) are skipped with a
warning naming them, and macOS AppleDouble files (``._*``) are ignored; when no dataset is found the error lists
the skipped files.

The built-in synthetic phantoms (``dataset_dir/IDM_phantoms``, case ids ``IDM_Phantom_XXX``) never join
real data: they are used only when nothing else below ``dataset_dir`` is a dataset, with a loud warning
on every run that uses them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

from ..errors import BadInputError
from .anatomy import PHANTOM_FOLDER, PHANTOM_PREFIX
from .transforms import ATLAS_FRAME

__all__ = ["IMAGE_SUFFIXES", "MSD_CHANNELS", "DatasetNotFoundError", "discover_cases"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# Decathlon modality names (as in its dataset.json) for the modality keys this bundle uses
MSD_CHANNELS = {"flair": "FLAIR", "t1": "T1w", "t1ce": "t1gd", "t2": "T2w"}


class DatasetNotFoundError(BadInputError, FileNotFoundError):
    """No dataset of a known layout below ``dataset_dir`` (a bad input, and a ``FileNotFoundError``)."""


def image_stem(name: str) -> str | None:
    """A file name less its image suffix (:data:`IMAGE_SUFFIXES`, in either case), else None."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _brats_cases(root: Path, modalities: Sequence[str]) -> list[dict]:
    """Case folders whose files are named ``<folder>_<modality>.<ext>`` (or DICOM series folders).

    Raises :class:`BadInputError` naming the modalities the case folders have when one of ``modalities``
    is in none of them.
    """
    pattern = re.compile(r"^(?P<case>.+)_(?P<modality>[A-Za-z0-9]+)$")
    found: dict[Path, dict[str, str]] = {}
    for path in sorted(root.rglob("*")):
        stem = image_stem(path.name) if path.is_file() else path.name if path.is_dir() else None
        match = pattern.match(stem or "")
        if not match or match["case"] != path.parent.name:
            continue
        if path.is_dir() and not any(path.glob("*.dcm")):
            continue
        found.setdefault(path.parent, {}).setdefault(match["modality"].lower(), str(path))
    available = sorted({m for files in found.values() for m in files})
    absent = [m for m in modalities if m not in available]
    if found and absent:
        named = f"modality {absent[0]!r} is" if len(absent) == 1 else f"modalities {', '.join(map(repr, absent))} are"
        raise BadInputError(
            f"{named} in none of the {len(found)} case folders below {str(root)!r}; the data has "
            f'{", ".join(available)}. Choose modalities from these, e.g. --modalities \'["t1","t2"]\'.'
        )
    folders = {folder: files for folder, files in found.items() if any(m in files for m in modalities)}
    segmented = all("seg" in files for files in folders.values())
    records = []
    for folder, files in folders.items():
        record = {"case": folder.name, "channels": {m: None for m in modalities}, "frame": ATLAS_FRAME}
        record.update({m: files.get(m, str(folder / f"{folder.name}_{m}.nii.gz")) for m in modalities})
        if segmented:
            record["seg"] = files["seg"]
        records.append(record)
    return records


def _datalist_cases(json_path: Path, content: object, modalities: Sequence[str]) -> list[dict]:
    """The case records of the datalist ``json_path`` (its parsed ``content``): its ``training`` items and, marked
    ``"split": "validation"``, those of its ``validation`` list; none when it is not a datalist.

    Raises:
        BadInputError: naming the file, for a ``validation`` entry that is not a list, an item that gives no path
            per modality, or a modality that a Decathlon ``modality`` map lacks.
    """
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        return []
    lists = ["training"]
    if "validation" in content:
        if not isinstance(content["validation"], list):
            raise BadInputError(
                f"{json_path}: 'validation' must be a list of items like those of 'training' (the validation split), "
                f"got {type(content['validation']).__name__}; remove it to split the training items by val_fraction."
            )
        lists.append("validation")
    channel_of = _decathlon_channels(json_path, content.get("modality"), modalities)
    segmented = all(
        isinstance(item, dict) and isinstance(item.get("label"), str) and (json_path.parent / item["label"]).is_file()
        for key in lists
        for item in content[key]
    )
    records = []
    for key in lists:
        items = load_decathlon_datalist(str(json_path), is_segmentation=False, data_list_key=key)
        for i, item in enumerate(items):
            record = {
                "channels": {m: channel_of.get(m) for m in modalities},
                **_item_paths(json_path, f"{key} item {i}", item, modalities, bool(channel_of)),
            }
            if channel_of:  # the Decathlon's volumes are BraTS volumes, in its atlas frame
                record["frame"] = ATLAS_FRAME
            if segmented:  # MONAI resolves only "image" paths without is_segmentation
                record["seg"] = str(json_path.parent / item["label"])
            if key == "validation":
                record["split"] = "validation"
            records.append(record)
    return _with_case_ids(records, json_path, modalities[0], four_d=bool(channel_of))


def _decathlon_channels(json_path: Path, msd: object, modalities: Sequence[str]) -> dict[str, int]:
    """``{modality: channel}`` of the 4D volumes of a Decathlon datalist whose ``modality`` map is ``msd``; empty for
    another datalist.

    Raises:
        BadInputError: naming the file, for a modality that the map lacks.
    """
    if not isinstance(msd, dict):
        return {}
    by_name = {str(name).lower(): int(index) for index, name in msd.items()}
    channel_of = {}
    for m in modalities:
        name = MSD_CHANNELS.get(m, m).lower()
        if name not in by_name:
            raise BadInputError(
                f"{json_path}: modality {m!r} is not among its channels {sorted(msd.values())}; "
                f"choose modalities from {sorted(k for k, v in MSD_CHANNELS.items() if v.lower() in by_name)}."
            )
        channel_of[m] = by_name[name]
    return channel_of


def _item_paths(json_path: Path, name: str, item: dict, modalities: Sequence[str], four_d: bool) -> dict[str, str]:
    """``{modality: path}`` of datalist item ``name``: one path per modality (relative to the datalist), one 4D
    ``image`` (``four_d``: a Decathlon's), or an ``image`` list in the modalities' order.

    Raises:
        BadInputError: naming the file and the item, for any other item.
    """
    if all(isinstance(item.get(m), str) for m in modalities):  # MONAI resolves "image" paths only
        return {m: str(json_path.parent / item[m]) for m in modalities}
    if isinstance(item.get("image"), str) and four_d:
        return dict.fromkeys(modalities, item["image"])
    if isinstance(item.get("image"), list) and len(item["image"]) == len(modalities):
        return dict(zip(modalities, item["image"], strict=True))
    raise BadInputError(
        f"{json_path}: {name} gives neither one path per modality {list(modalities)} nor an 'image' list of "
        f"{len(modalities)} paths nor a 4D 'image' with a 'modality' map: {item}"
    )


def _case_id(path: Path, modality: str | None) -> str:
    """A case id from an image path: its name without the image suffix and, for a one-modality file, without
    a ``_<modality>`` / ``-<modality>`` ending (``sub-01_t1.nii.gz`` → ``sub-01``); the folder's name for a
    file named after the modality alone (``sub-01/T1.nii.gz`` → ``sub-01``)."""
    stem = image_stem(path.name) or path.name
    if modality is None:
        return stem
    if stem.lower() == modality.lower():
        return path.parent.name
    match = re.fullmatch(rf"(?P<case>.+)[_-]{re.escape(modality)}", stem, flags=re.IGNORECASE)
    return match["case"] if match else stem


def _with_case_ids(records: list[dict], json_path: Path, modality: str, four_d: bool) -> list[dict]:
    """``records`` with a ``case`` id each, taken from the path of their first modality (the whole 4D file when
    ``four_d``), so that an id names the same volumes however the datalist is ordered (a run's validation
    split is recorded by id). Ids that file names alone leave ambiguous are prefixed with the file's folder
    below the datalist's (``site_a/sub-01``, ``site_b/sub-01``).

    Raises:
        BadInputError: when two items (of ``training`` or ``validation``) give the same file, or their files leave
            two ids equal anyway.
    """
    paths = [Path(record[modality]) for record in records]
    names = [_case_id(path, None if four_d else modality) for path in paths]
    ids = []
    for path, case in zip(paths, names, strict=True):
        if names.count(case) > 1:
            folder = path.parent.relative_to(json_path.parent) if path.is_relative_to(json_path.parent) else path.parent
            case = folder.as_posix() if case == path.parent.name else (folder / case).as_posix()
        ids.append(case)
    for index, case in enumerate(ids):
        if ids.count(case) > 1:
            other_index = ids.index(case, index + 1)
            path, other = paths[index], paths[other_index]
            if path == other:
                lists = sorted({records[i].get("split", "training") for i in (index, other_index)})
                raise BadInputError(
                    f"{json_path}: {path} is given by more than one {'/'.join(lists)} item; list each case once (a "
                    "validation case in 'validation' only)."
                )
            raise BadInputError(
                f"{json_path}: {path} and {other} give the same case id {case!r} (file name without suffix and "
                "modality); rename one of them."
            )
    for record, case in zip(records, ids, strict=True):
        record["case"] = case
    return records


def _find_cases(root: Path, modalities: Sequence[str]) -> tuple[list[dict], list[Path]]:
    """The records of the first datalist JSON below ``root`` that has any, else of its BraTS case folders; and the
    ``*.json`` files skipped because they are not valid UTF-8 JSON (each named in a warning). AppleDouble files
    (``._*``, macOS metadata beside every file copied from its disks) are not read at all."""
    unreadable = []
    for json_path in sorted(root.rglob("*.json")):
        if json_path.name.startswith("._") or not json_path.is_file():
            continue
        try:
            content = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
            logger.warning("Skipping %s: not a valid UTF-8 JSON file (%s).", json_path, error)
            unreadable.append(json_path)
            continue
        records = _datalist_cases(json_path, content, modalities)
        if records:
            return records, unreadable
    return _brats_cases(root, modalities), unreadable


def _is_phantom(record: dict, phantom_folder: Path, modality: str) -> bool:
    """A case of the built-in phantoms: named ``IDM_Phantom_XXX`` (wherever it was written) or in
    ``dataset_dir/IDM_phantoms`` (the folder a training run writes them to)."""
    return record["case"].startswith(f"{PHANTOM_PREFIX}_") or Path(record[modality]).is_relative_to(phantom_folder)


def _folders(records: Sequence[dict], modality: str) -> set[str]:
    """The folders that hold the case folders of ``records``."""
    return {str(Path(r[modality]).parent.parent) for r in records}


def discover_cases(dataset_dir: str | Path, modalities: Sequence[str] = ("t1", "t2")) -> list[dict]:
    """Case records (see the module docstring) of the dataset below ``dataset_dir``, sorted by case id.

    A datalist JSON wins over file naming when both are present (it is the explicit choice). Phantom
    cases are left out whenever real cases are found (the log says so) and returned, with a loud warning,
    only when there is nothing else.

    Raises:
        BadInputError: when ``dataset_dir`` is a file, ``modalities`` is not a non-empty list of names, or a
            requested modality is in none of the cases (the message names those the data has).
        DatasetNotFoundError: when ``dataset_dir`` does not exist or holds none of the three layouts (the message
            lists the ``*.json`` files skipped as invalid JSON).
    """
    root = Path(dataset_dir)
    if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise BadInputError(
            f"modalities must be a non-empty list of modality names such as ['t1', 't2'] (BraTS2020 has t1, t1ce, "
            f"t2, flair); got {modalities!r}."
        )
    if root.exists() and not root.is_dir():
        raise BadInputError(
            f"dataset_dir {str(root)!r} is a file; give the folder that holds the data (BraTS2020 case folders, a "
            "Decathlon Task01 dataset.json or a datalist JSON, at any depth), or a missing or empty folder to "
            "train on the built-in synthetic phantoms."
        )
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset_dir {str(root)!r} does not exist.")
    modalities = [m.lower() for m in modalities]
    found, unreadable = _find_cases(root, modalities)
    records = sorted(found, key=lambda r: r["case"])
    phantom_folder = root / PHANTOM_FOLDER
    phantoms, real = [], []
    for record in records:
        (phantoms if _is_phantom(record, phantom_folder, modalities[0]) else real).append(record)
    if real:
        left_out = _folders(phantoms, modalities[0]) | ({str(phantom_folder)} if phantom_folder.is_dir() else set())
        if left_out:
            logger.warning(
                "Found %d real cases below %s: the synthetic phantoms in %s are left out (phantoms never join real "
                "data; delete them if they are no longer needed).",
                len(real),
                root,
                ", ".join(sorted(left_out)),
            )
        return real
    if phantoms:
        banner = "=" * 78
        logger.warning(
            "\n%s\nUSING %d SYNTHETIC PHANTOMS from %s, NOT REAL MRI.\nPut BraTS2020 (or Decathlon Task01, or a "
            "datalist JSON) below %s to use real data; the phantoms are then left out.\n%s",
            banner,
            len(phantoms),
            ", ".join(sorted(_folders(phantoms, modalities[0]))),
            root,
            banner,
        )
        return phantoms
    skipped = ""
    if unreadable:
        names = ", ".join(map(str, unreadable[:5]))
        names += f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        skipped = (
            f" These *.json files were skipped because they are not valid UTF-8 JSON (repair a datalist "
            f"among them): {names}."
        )
    raise DatasetNotFoundError(
        f"No dataset found below {str(root)!r}: expected BraTS2020 case folders "
        f"(<case>/<case>_{{{','.join(modalities)}}}.nii.gz), a Decathlon Task01 dataset.json, or a datalist JSON."
        + skipped
    )
