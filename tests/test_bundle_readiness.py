"""Model-zoo and MONAI Label readiness: metadata, network in/out, TorchScript export, bundle inference task."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import recorded_checkpoint, run_python
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out

import bundle
from bundle.data import write_ellipsoid_phantoms
from bundle.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1]
# a local copy of the MONAI metadata schema (metadata.json's "schema" URL); the test never downloads it
SCHEMA_VARIABLE = "IDM_BUNDLE_SCHEMA"
# the configurations a user runs on their own or as an overlay on another (BASES), whose settings README.md describes
USER_CONFIGS = ("train.json", "inference.json", "evaluate.json", "audit.json", "invert.json")
BASES = {"evaluate.json": "train.json", "audit.json": "train.json", "invert.json": "train.json"}


def test_metadata_passes_the_bundle_schema(monkeypatch):
    """Against the schema file that ``$IDM_BUNDLE_SCHEMA`` names (a path, relative to the bundle root or absolute,
    e.g. ``../shared/monai/meta_schema_20240725.json``); skipped without it. MONAI's ``verify_metadata`` passes
    metadata.json's schema URL and ``filepath`` to ``download_url``, which skips an existing file; that call is
    replaced by a check that it is given this file, so the test never reaches the network."""
    if not os.environ.get(SCHEMA_VARIABLE):
        pytest.skip(
            f'set {SCHEMA_VARIABLE} to a local copy of the MONAI metadata schema (metadata.json\'s "schema" '
            f"URL), e.g. {SCHEMA_VARIABLE}=../shared/monai/meta_schema_20240725.json"
        )
    schema = (ROOT / os.environ[SCHEMA_VARIABLE]).resolve()
    assert schema.is_file(), f"{SCHEMA_VARIABLE}={os.environ[SCHEMA_VARIABLE]}: no such file"

    def no_download(url, filepath, **kwargs):
        assert Path(filepath).resolve() == schema, f"verify_metadata would download {url} to {filepath}"

    monkeypatch.setattr("monai.bundle.scripts.download_url", no_download)
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(schema))


def test_package_version_is_the_metadata_version():
    assert bundle.__version__ == json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]


def _parser(ckpt_path: Path) -> ConfigParser:
    """inference.json as MONAI Label and the model zoo's checks read it, for the model at ``ckpt_path``."""
    parser = ConfigParser()
    parser.read_config(ROOT / "configs/inference.json")
    parser["ckpt_path"] = str(ckpt_path)
    return parser


def test_network_input_and_output_match_the_metadata(tmp_path):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(ROOT / "configs/metadata.json"),
        config_file=str(ROOT / "configs/inference.json"),
        extra_forward_args={"timesteps": torch.tensor([10])},
        ckpt_path=str(recorded_checkpoint(tmp_path)),
    )


def _workflow(config_file, workflow_type: str, **overrides) -> ConfigWorkflow:
    """MONAI's bundle workflow of ``config_file``, parsed as ``monai.bundle run`` parses it (its ``initialize``
    steps, which check settings and plan memory, not run)."""
    workflow = ConfigWorkflow(
        config_file=config_file,
        workflow_type=workflow_type,
        init_id="parse_only",
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **overrides,
    )
    workflow.initialize()
    return workflow


def test_the_configs_have_monais_bundle_properties(tmp_path):
    """What the model zoo and MONAI Label look up: every required property of MONAI's train and infer workflows, and
    the optional ones under MONAI's ids (``check_properties`` lists what it misses), for inference.json with a
    generation model and with a translation model."""
    generator = recorded_checkpoint(tmp_path / "generator")
    assert (
        _workflow(str(ROOT / "configs" / "inference.json"), "infer", ckpt_path=str(generator)).check_properties() == []
    )
    write_ellipsoid_phantoms(tmp_path / "data", num_cases=3, shape=(20, 20, 16))
    translator = recorded_checkpoint(tmp_path / "translator", ("t2",), ("t1",))
    translate = _workflow(
        str(ROOT / "configs" / "inference.json"),
        "infer",
        ckpt_path=str(translator),
        dataset_dir=str(tmp_path / "data"),
    )
    assert translate.check_properties() == []
    small = {
        "spatial_size": [16, 16, 16],
        "network_def#channels": [8, 16, 32],
        "attention_levels": [False, True, True],
        "num_workers": 0,
        "dataset_dir": str(tmp_path / "data"),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs"),
    }
    assert _workflow(str(ROOT / "configs" / "train.json"), "train", **small).check_properties() == []


def test_torchscript_export_matches_the_eager_network(tmp_path):
    checkpoint = recorded_checkpoint(tmp_path)
    command = ["scripts/export_torchscript.py", "--ckpt_file", checkpoint, "--filepath", tmp_path / "model.ts"]
    result = run_python(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |TorchScript − eager| = 0" in result.stdout
    exported = torch.jit.load(tmp_path / "model.ts")
    eager = _parser(checkpoint).get_parsed_content("network_def")
    eager.load_state_dict(torch.load(checkpoint, weights_only=True))
    x, t = torch.rand(1, 2, 16, 16, 16), torch.tensor([99])
    with torch.no_grad():
        assert torch.allclose(exported(x, t), eager.eval()(x, t), atol=1e-6)
    again = run_python(command)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_export_errors_name_the_scripts_own_arguments(tmp_path):
    spec = importlib.util.spec_from_file_location("export_torchscript", ROOT / "scripts" / "export_torchscript.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(BadInputError, match="--ckpt_file") as info:
        script.export(ckpt_file=str(tmp_path / "missing.pt"), filepath=str(tmp_path / "model.ts"))
    assert "--ckpt_path" not in str(info.value)
    checkpoint = recorded_checkpoint(tmp_path / "other")
    (checkpoint.parent / "run.json").unlink()
    with pytest.raises(BadInputError, match=r"There is no run.json beside"):
        script.export(ckpt_file=str(checkpoint), filepath=str(tmp_path / "model.ts"))
    assert not (tmp_path / "model.ts").exists()


def test_monai_label_style_bundle_inference(tmp_path):
    """What MONAI Label's BundleInferTask does: read inference.json, build network_def, load the weights,
    run preprocessing on an image file, call the inferer as inferer(inputs, network), postprocess."""
    checkpoint = recorded_checkpoint(tmp_path)
    parser = _parser(checkpoint)
    parser["bundle_root"] = str(ROOT)
    for key, value in {"sampler": "ddim", "num_inference_steps": 2}.items():
        parser[key] = value
    network = parser.get_parsed_content("network_def", lazy=False)  # a fresh instance, as the task builds it
    network.load_state_dict(torch.load(checkpoint, weights_only=True))
    image_path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 24, 18).astype(np.float32), np.eye(4)), image_path)
    data = parser.get_parsed_content("preprocessing")({"image": str(image_path)})
    inferer = parser.get_parsed_content("inferer")
    data["pred"] = inferer(inputs=data["image"][None], network=network)[0]
    data = parser.get_parsed_content("postprocessing")(data)
    assert data["pred"].shape == (2, 16, 16, 16)
    assert data["pred"].min() >= 0 and data["pred"].max() <= 1


def _is_user_setting(value, key: str = "") -> bool:
    """Whether a top-level config value is a setting for users rather than plumbing built from settings.

    Settings are plain data (a number, string, boolean, null, or a list of them) or a ``$`` expression that
    builds no object: one that neither calls into the ``bundle`` package nor uses an attribute or item of
    another id (``"$@bundle_root + '/data'"``, ``device``). Components and groups of them (dicts: ``settings``,
    ``samplers``, ``run_record``, ``summary_writer``, ``noise_scheduler``), ``@`` references, lists of expressions
    (``imports``, ``initialize``, ``run``) and a ``key`` that overrides an argument of another id
    (``cases#write_phantoms``) are plumbing.
    """
    if "#" in key:
        return False
    if isinstance(value, dict) or (isinstance(value, str) and value.startswith("@")):
        return False
    if isinstance(value, list):
        return all(not (isinstance(v, str) and v.startswith(("$", "@"))) and _is_user_setting(v) for v in value)
    if isinstance(value, str) and value.startswith("$"):
        return "bundle." not in value and re.search(r"@\w+[.\[]", value) is None
    return True


def test_readme_settings_paragraph_names_every_user_setting_of_the_configs():
    """Every user setting of the user configs is a row (`` `name` `` | default | meaning) of its config's table in the
    README's "## Settings" section (the table under the "### " heading that names ``configs/<name>``); a setting with
    train.json's default (or, for an overlay, its base's) may rely on that row. Every row names an id that its config
    has (an overlay's: on top of its base's)."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## Settings\n" in readme, "README.md has no '## Settings' section"
    section = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[str]] = {}
    for part in section.split("\n### ")[1:]:
        heading, _, body = part.partition("\n")
        named = re.findall(r"configs/(\w+\.json)", heading)
        assert named, f"README.md's settings heading {heading!r} names no configs/<name>.json"
        tables[named[0]] = re.findall(r"^\| `([^`]+)` \|", body, flags=re.MULTILINE)
    assert set(USER_CONFIGS) <= set(tables), f"README.md's Settings section has tables for {sorted(tables)} only"
    configs = {name: json.loads((ROOT / "configs" / name).read_text()) for name in USER_CONFIGS}
    settings = {name: {k for k, v in config.items() if _is_user_setting(v, k)} for name, config in configs.items()}
    every = set().union(*settings.values())
    assert {
        "bundle_root",
        "dataset_dir",
        "device",
        "micro_batch_size",
        "ckpt_path",
        "feature_extractor",
        "schedule",
        "attention_levels",
        "memory_efficient",
        "sampler",
        "num_inference_steps",
    } <= every
    assert (
        not {
            "imports",
            "cases",
            "network",
            "network_def",
            "ema",
            "train",
            "run",
            "settings",
            "samplers",
            "model",
            "run_record",
            "summary_writer",
            "noise_scheduler",
            "process_group",
            "cases#write_phantoms",
        }
        & every
    )

    def described_by_base(name: str, key: str) -> bool:
        base = BASES.get(name, "train.json")
        return key in tables[base] and configs[name][key] == configs[base].get(key)

    missing = sorted(
        f"{name}: {key}"
        for name, keys in settings.items()
        for key in keys
        if key not in tables[name] and not described_by_base(name, key)
    )
    assert not missing, f"README.md's settings tables do not describe {missing}"

    def has_id(config: object, config_id: str) -> bool:
        for part in config_id.split("#"):
            if isinstance(config, dict) and part in config:
                config = config[part]
            elif isinstance(config, list) and part.isdigit() and int(part) < len(config):
                config = config[int(part)]
            else:
                return False
        return True

    scopes = {name: configs[BASES[name]] | configs[name] if name in BASES else configs[name] for name in USER_CONFIGS}
    unknown = sorted(f"{name}: {row}" for name in USER_CONFIGS for row in tables[name] if not has_id(scopes[name], row))
    assert not unknown, f"README.md's settings tables name ids that the configs do not have: {unknown}"
    repeated = sorted(f"{name}: {row}" for name, rows in tables.items() for row in set(rows) if rows.count(row) > 1)
    assert not repeated, f"README.md's settings tables name these twice: {repeated}"


def test_the_default_output_folders_are_git_ignored():
    """Runs with the defaults write below the bundle root: their outputs must not show up as changes to commit."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    folders = {}
    for name in USER_CONFIGS:
        default = json.loads((ROOT / "configs" / name).read_text())["output_dir"]
        folders[name] = re.fullmatch(r"\$@bundle_root \+ '/(\w+)'", default)[1]
    assert folders == {
        "train.json": "runs",
        "inference.json": "samples",
        "evaluate.json": "eval",
        "audit.json": "audit",
        "invert.json": "inversion",
    }
    missing = [folder for folder in folders.values() if f"/{folder}/" not in ignored]
    assert not missing, f".gitignore does not list {missing}"
