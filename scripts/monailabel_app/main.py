"""A MONAI Label app that serves the bundle's translation models: a request names one image of a study (its T1, say)
and gets the generated modality (its T2) back, as an image on that file's grid and affine.

Start it from the MONAI Label environment (``requirements-label.txt``; docs/monai_label.md)::

    monailabel start_server --app scripts/monailabel_app --studies /path/to/studies \
        --conf models /path/to/bundle --host 127.0.0.1 --port 8000

``--conf models``: one or more bundle folders, comma-separated, each a folder with ``configs/inference.json``,
``configs/metadata.json``, the ``bundle`` package and a trained translation model in ``models/model.pt`` (with the
``run.json`` beside it); a bare name is looked up in this app's ``model/`` folder, as MONAI Label's sample apps do.
Nothing is downloaded. Each is served as ``/infer/<folder name>``; its task (:class:`SynthesisInferTask`) reads
the sampling options (``bundle.serving.request_options``) from the request's ``params``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from fastapi import HTTPException
from monai.bundle import ConfigParser
from monai.transforms import CopyItemsd, DeleteItemsd, Lambdad
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

# a request's parsed inference.json, output channel and image path (MONAI Label's "image_path", kept under another
# key while the bundle's preprocessing runs: MONAI's Spacingd updates every "image_*" key as a metadata dictionary)
_PARSER, _CHANNEL, _PATH = "idm_config", "idm_channel", "idm_image_path"


def _bundle_folders(app_dir: str, conf: dict) -> dict[str, Path]:
    """``--conf models``'s bundle folders by the name they are served under, each checked for what the task reads."""
    entries = [e.strip() for e in conf.get("models", "").split(",") if e.strip()]
    if not entries:
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR,
            "Pass the bundle to serve: --conf models /path/to/bundle (a folder with configs/inference.json and a "
            "trained translation model in models/model.pt), or several, comma-separated.",
        )
    folders = {}
    for entry in entries:
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            folder = Path(app_dir) / "model" / entry
        needed = ["configs/inference.json", "configs/metadata.json", "models/model.pt", "models/run.json"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                f"--conf models {entry}: {folder.resolve()} is not a trained bundle: it has no {', '.join(missing)} "
                "(train one with configs/train.json, or name the folder that holds it).",
            )
        folders[folder.resolve().name] = folder.resolve()
    return folders


class SynthesisInferTask(BasicInferTask):
    """MONAI Label's task for a bundle's translation model: ``inference.json``'s network, preprocessing, inferer and
    postprocessing, typed ``others`` (the answer is an image volume, not a label map). A request's image names its
    case; the given modalities are read from beside it and checked (``bundle.serving.case_files``, then
    ``bundle.translation.input_cases``); the answer is the generated ``modality`` on the grid and affine of the first
    given file, float32 in [0, 1]. A request's sample depends only on its options (``seed`` among them). A bad
    request is answered 400 with the reason.

    It builds on MONAI Label's ``BasicInferTask``, not its ``BundleInferTask``, whose module imports torchvision: the
    PyPI torchvision is a CUDA build that cannot load its operators beside the CPU build of torch. The bundle's
    folder goes on ``sys.path`` for its ``bundle`` package (the first folder's package serves every bundle)."""

    def __init__(self, folder: Path, conf: dict) -> None:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        self.bundle_config = ConfigParser()
        self.bundle_config.read_config(folder / "configs" / "inference.json")
        self.bundle_config["bundle_root"] = str(folder)
        self.model = self.bundle_config.get_parsed_content("model")
        from bundle.diffusion import DEFAULT_SAMPLERS, SAMPLERS

        if not self.model.condition_modalities:
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                f"{folder}: its model generates {self.model.modalities} from nothing; MONAI Label answers a request "
                "about an image, so it serves translation models only. Generate with python -m monai.bundle run "
                "--config_file configs/inference.json.",
            )
        sampler = self.bundle_config["sampler"] or DEFAULT_SAMPLERS[self.model.objective]
        super().__init__(
            path=str(folder / "models" / "model.pt"),
            network=self.bundle_config.get_parsed_content("network_def"),
            type=InferType.OTHERS,
            labels={},
            dimension=3,
            description=(
                f"{', '.join(self.model.condition_modalities)} → {', '.join(self.model.modalities)} (IDM on a "
                f"{'×'.join(map(str, self.model.spatial_size))} grid); the request's image names its case"
            ),
            config={  # the options a viewer shows; a list is a choice, its first entry the default
                "sampler": [sampler, *sorted(set(SAMPLERS[self.model.objective]) - {sampler})],
                "num_inference_steps": self.bundle_config["num_inference_steps"] or "",
                "eta": self.bundle_config["eta"],
                "seed": self.bundle_config["seed"],
                "modality": self.model.modalities,
            },
            load_strict=True,
            preload=conf.get("preload", "false").lower() == "true",
        )

    def pre_transforms(self, data=None) -> list:
        """Checks the request (its case's files, its options) and keeps ``inference.json`` parsed with its options
        in ``data`` (a fresh parse for each request, so none sees another's)."""
        from bundle.data import preprocessing
        from bundle.errors import BadInputError
        from bundle.serving import case_files, request_options
        from bundle.translation import input_cases

        given = self.model.condition_modalities
        try:
            (case,) = input_cases(None, case_files(data.get("image_path", ""), self.model), given)
            overrides, data[_CHANNEL] = request_options(data, self.model)
        except BadInputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        data.update(case)
        data[_PATH] = data.pop("image_path")
        data[_PARSER] = ConfigParser(copy.deepcopy(self.bundle_config.config))
        data[_PARSER].update(overrides)
        return [preprocessing(given, self.model.spatial_size, self.model.spacing)]

    def inferer(self, data=None):
        return data[_PARSER].get_parsed_content("inferer")

    def post_transforms(self, data=None) -> list:
        channel = data[_CHANNEL]
        post = data[_PARSER].get_parsed_content("postprocessing")
        return [
            *post.transforms,
            Lambdad("pred", lambda pred: pred[channel]),
            CopyItemsd(_PATH, names="image_path"),  # the writer names the answer's file type after it
            DeleteItemsd([_PARSER, _CHANNEL, _PATH]),
        ]


class IDMApp(MONAILabelApp):
    """The bundle's translation models (``--conf models``), each as a :class:`SynthesisInferTask`, and no training.
    A request naming an image the studies do not have is answered 404; the server goes on serving after any bad
    request."""

    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.bundles = _bundle_folders(app_dir, conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="IDM - Invertible Diffusion Model",
            description="Missing-modality synthesis (e.g. T1 → T2) with the bundle's translation models",
            version="1",
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {name: SynthesisInferTask(folder, self.conf) for name, folder in self.bundles.items()}

    def infer(self, request, datastore=None):
        image = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image, str) and not Path(image).exists() and image not in store.list_images():
            raise HTTPException(
                status_code=404,
                detail=f"No image {image!r} in the studies {self.studies}; GET /datastore/?output=all lists them.",
            )
        return super().infer(request, datastore)
