"""A real MONAI Label server (scripts/monailabel_app, run from the MONAI Label environment of
requirements-label.txt) serving the shipped T1 → T2 model: /infer answers a NIfTI T2 on the input's grid and affine,
the same volume the bundle's own inference makes; bad requests get an error answer and the server goes on serving;
stopping it leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.data import write_anatomy_cases

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "brains_6mm_t1_to_t2"
LABEL_PYTHON = Path(os.environ.get("IDM_LABEL_PYTHON", ROOT / ".venv-label" / "bin" / "python"))
OPTIONS = {"sampler": "ddim", "num_inference_steps": 10, "seed": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answer(request: urllib.request.Request) -> tuple[int, bytes]:
    """The server's status and body for ``request``, an error status included."""
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _post(url: str, params: dict) -> tuple[int, bytes]:
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    return _answer(urllib.request.Request(url, data=body, method="POST"))


def _post_file(url: str, path: Path) -> tuple[int, bytes]:
    """``url`` with ``path`` uploaded as the request's ``file`` (a multipart form, as ``curl -F file=@path`` sends)."""
    boundary = "idm-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    return _answer(request)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server on 127.0.0.1 at a free port: (base URL, studies folder, its /info/ answer, its process); stopped
    after the module."""
    if not LABEL_PYTHON.is_file():
        pytest.skip(
            f"no MONAI Label environment at {LABEL_PYTHON}: build it with python -m venv .venv-label && "
            ".venv-label/bin/pip install -r requirements-label.txt (or set IDM_LABEL_PYTHON to its python)"
        )
    tmp = tmp_path_factory.mktemp("monai_label")
    bundle_dir = tmp / "idm_t1_to_t2"  # the bundle as a user lays it out: configs, the package, the trained model
    (bundle_dir / "models").mkdir(parents=True)
    for name in ("configs", "bundle"):
        (bundle_dir / name).symlink_to(ROOT / name)
    for name in ("model.pt", "run.json"):
        shutil.copy(MODEL / name, bundle_dir / "models" / name)
    cases = write_anatomy_cases(tmp / "data", num_cases=1, spacing=4.0, seed=5)  # the model's grid: 6 mm
    studies = tmp / "studies"
    studies.mkdir()
    for name in ("t1", "t2"):
        shutil.copy(cases[0] / f"{cases[0].name}_{name}.nii.gz", studies / f"case01_{name}.nii.gz")
    shutil.copy(cases[0] / f"{cases[0].name}_t2.nii.gz", studies / "lonely_t2.nii.gz")
    app = tmp / "app"
    shutil.copytree(ROOT / "scripts" / "monailabel_app", app)
    port, log = _free_port(), tmp / "server.log"
    command = [str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    command += ["--conf", "models", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port)]
    env = os.environ | {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=5) as answer:
                    info = json.loads(answer.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"no answer from {url} in 180 s:\n{log.read_text()[-4000:]}"
                time.sleep(1)
        yield url, studies, info, process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Ends the server's process group (SIGTERM, then SIGKILL after 30 s)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _bundle_translation(t1: Path) -> torch.Tensor:
    """The bundle's own answer for ``t1`` in this process: inference.json's preprocessing, inferer and
    postprocessing with the request's options."""
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "inference.json")
    for key, value in {"ckpt_path": str(MODEL / "model.pt"), **OPTIONS}.items():
        parser[key] = value
    network = parser.get_parsed_content("network")
    data = parser.get_parsed_content("preprocessing")({"image": str(t1)})
    data["pred"] = parser.get_parsed_content("inferer")(inputs=data["image"][None], network=network)[0]
    return parser.get_parsed_content("postprocessing")(data)["pred"][0]


def test_the_server_answers_a_t2_on_the_inputs_grid(server, tmp_path):
    url, studies, info, _ = server
    task = info["models"]["idm_t1_to_t2"]
    assert task["type"] == "others" and task["labels"] == {}, task
    assert task["config"]["modality"] == ["t2"] and "ddim" in task["config"]["sampler"]
    status, body = _post(f"{url}/infer/idm_t1_to_t2?image=case01_t1&output=image", OPTIONS)
    assert status == 200, body[-2000:]
    (tmp_path / "t2.nii.gz").write_bytes(body)
    answer, given = nib.load(tmp_path / "t2.nii.gz"), nib.load(studies / "case01_t1.nii.gz")
    volume = answer.get_fdata()
    assert volume.shape == given.shape
    np.testing.assert_allclose(answer.affine, given.affine, atol=1e-4)
    assert np.isfinite(volume).all() and volume.min() >= 0 and volume.max() <= 1 and volume.max() > 0.1
    expected = _bundle_translation(studies / "case01_t1.nii.gz").numpy()
    np.testing.assert_allclose(volume, expected, atol=1e-4)


def test_bad_requests_get_an_error_answer_and_the_server_goes_on(server):
    url, studies, _, process = server
    status, body = _post(f"{url}/infer/idm_t1_to_t2?image=nobody_t1", OPTIONS)
    assert status == 404 and b"No image 'nobody_t1' in the studies" in body, body
    status, body = _post(f"{url}/infer/idm_t1_to_t2?image=lonely_t2", OPTIONS)
    assert status == 400 and b"lonely_t2.nii.gz has no t1: lonely_t1.nii.gz beside it" in body, body
    status, body = _post(f"{url}/infer/idm_t1_to_t2?image=case01_t1", {**OPTIONS, "sampler": "euler"})
    assert status == 400 and b"sampler='euler'" in body, body
    status, body = _post_file(f"{url}/infer/idm_t1_to_t2", studies / "case01_t1.nii.gz")
    assert status == 400 and b"an uploaded file loses its name" in body, body
    status, _ = _post(f"{url}/infer/idm_t1_to_t2?image=case01_t2&output=image", OPTIONS)  # the T1 beside it is used
    assert status == 200 and process.poll() is None


def test_stopping_the_server_leaves_no_process(server):
    _, _, _, process = server
    _stop(process)
    assert process.returncode is not None
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # nothing of the server's process group is left
        os.killpg(process.pid, 0)
