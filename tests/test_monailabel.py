"""apps/monailabel: the real MONAI Label server, started with the app on loopback, segments the real CT.

The server runs in its own environment, ``.venv-monailabel`` (``bash scripts/install_monailabel.sh``:
monailabel 0.8.5 needs numpy<2 and its own torch/torchvision pair), so this test starts it as a
subprocess with that interpreter and talks HTTP to it; it is skipped when that environment is absent.
The studies folder is a temporary copy of the shipped CT; the server is stopped (its process
group) at the end.
"""

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

from stmt_monai.labels import LABELS, ORGANS

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "monailabel"
SERVER_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"
HOST = "127.0.0.1"
#: seconds to wait for the server's /info/ (imports monailabel, torch, the app), and for one inference
START_TIMEOUT_S, INFER_TIMEOUT_S = 240, 600
LIVER = next(number for number, name in ORGANS.items() if name == "liver")
#: liver DSC floor of the cascade with the shipped demo weights on the real CT. PROVISIONAL: set
#: before the demo weights existed (the same cascade with networks fitted to this CT gives 0.92,
#: tests/test_inference.py; a flipped or shifted crop gives < 0.3); measure and set it again.
LIVER_DSC_FLOOR = 0.5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SERVER_PYTHON.is_file(),
        reason="no .venv-monailabel: make it with `bash scripts/install_monailabel.sh` (monailabel 0.8.5 env)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_info(url: str, server: subprocess.Popen, log: Path) -> dict:
    """Poll ``url`` (the server's ``/info/``) until it answers; fail with the log if the server
    exits or :data:`START_TIMEOUT_S` passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"MONAI Label server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return get_json(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    pytest.fail(f"MONAI Label server gave no /info/ in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after 30 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_ct):
    """The app's server with ``--conf models cascade`` over a studies folder holding the real CT;
    yields ``(base_url, info, studies, log)``."""
    work = tmp_path_factory.mktemp("monailabel")
    studies = work / "studies"
    studies.mkdir()
    shutil.copy(real_ct, studies / real_ct.name)
    log = work / "server.log"
    port = free_port()
    command = [
        str(SERVER_PYTHON), "-m", "monailabel.main", "start_server",
        "--app", str(APP), "--studies", str(studies),
        "--conf", "models", "cascade",
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://{HOST}:{port}"
        info = wait_for_info(f"{base}/info/", process, log)
        yield base, info, studies, log
    finally:
        stop(process)


def test_info_lists_the_cascade_with_flare_labels(server):
    _, info, _, log = server
    assert "cascade" in info["models"], f"cascade not served (its weights?):\n{log.read_text()[-4000:]}"
    model = info["models"]["cascade"]
    assert model["type"] == "segmentation"
    assert model["labels"] == {name: number for number, name in LABELS.items()}


def test_infer_cascade_segments_the_real_ct(server, real_ct, real_organs):
    """POST /infer/cascade by image id: the label map comes back on the CT's grid and affine, with
    the liver where the reference mask has it. Through the server, networks fitted to this CT
    (tests/cascade_helpers.py) gave liver DSC 0.924, as the cascade called directly (0.92)."""
    base, _, _, log = server
    image_id = real_ct.name.removesuffix(".nii.gz")
    query = urllib.parse.urlencode({"image": image_id, "output": "image"})
    body = urllib.parse.urlencode({"params": "{}"}).encode()
    start = time.monotonic()
    try:
        with urllib.request.urlopen(f"{base}/infer/cascade?{query}", data=body, timeout=INFER_TIMEOUT_S) as response:
            payload = response.read()
    except urllib.error.HTTPError as err:
        pytest.fail(f"/infer/cascade answered {err.code}: {err.read()[:2000]!r}\n{log.read_text()[-4000:]}")
    seconds = time.monotonic() - start

    result = Path(log).with_name("cascade.nii.gz")
    result.write_bytes(payload)
    labels_image, ct = nib.load(result), nib.load(real_ct)
    labels = np.asarray(labels_image.dataobj)
    truth = np.asarray(nib.load(real_organs).dataobj)
    assert labels.shape == ct.shape
    np.testing.assert_allclose(labels_image.affine, ct.affine, atol=1e-3)
    assert set(np.unique(labels).tolist()) <= {0, *LABELS}
    predicted, expected = labels == LIVER, truth == LIVER
    dice = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum())
    print(f"/infer/cascade: {seconds:.1f} s, labels {sorted(np.unique(labels).tolist())}, liver DSC {dice:.3f}")
    assert dice >= LIVER_DSC_FLOOR
