"""stmt_monai.inference.batch: a folder run whose reading and writing overlap the networks gives
exactly what the one-by-one loop gives (outputs, order, failures, skips)."""

import json
import threading

import numpy as np
import pytest
from cascade_helpers import random_bundles

from stmt_monai.inference.batch import segment_folder
from stmt_monai.inference.cascade import Cascade
from stmt_monai.io import save_nifti


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    return Cascade(random_bundles(tmp_path_factory.mktemp("bundles")), threads=1)


@pytest.fixture()
def folder(tmp_path, real_ct):
    """Two good CTs around two bad files (corrupt, 2D), so failures fall between cases that are read ahead."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_0000.nii.gz").write_bytes(real_ct.read_bytes())
    (folder / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file" * 10)
    save_nifti(folder / "c_flat.nii.gz", np.zeros((64, 64, 1), np.int16), np.eye(4))
    (folder / "d_0000.nii.gz").write_bytes(real_ct.read_bytes())
    return folder


def test_overlapped_batch_gives_what_the_loop_gives(cascade, folder, tmp_path, monkeypatch):
    threads = {"read": set(), "write": set()}
    read, write = cascade.read, __import__("stmt_monai.inference.batch", fromlist=["write_case"]).write_case

    def recording_read(*args, **kwargs):
        threads["read"].add(threading.current_thread().name)
        return read(*args, **kwargs)

    def recording_write(*args, **kwargs):
        threads["write"].add(threading.current_thread().name)
        return write(*args, **kwargs)

    monkeypatch.setattr(cascade, "read", recording_read)
    monkeypatch.setattr("stmt_monai.inference.batch.write_case", recording_write)
    loop = segment_folder(cascade, folder, tmp_path / "loop", progress=False, overlap=False)
    assert threads["read"] == threads["write"] == {threading.current_thread().name}
    threads = {"read": set(), "write": set()}
    overlapped = segment_folder(cascade, folder, tmp_path / "overlapped", progress=False)
    # reading and writing ran on their own threads, off the one that runs the networks
    assert {name.split("_")[0] for name in threads["read"]} == {"stmt-read"}
    assert {name.split("_")[0] for name in threads["write"]} == {"stmt-write"}
    assert overlapped.written == loop.written == [str(folder / "a_0000.nii.gz"), str(folder / "d_0000.nii.gz")]
    assert overlapped.failed == loop.failed and [c.split("/")[-1] for c, _ in loop.failed] == ["b_corrupt.nii.gz", "c_flat.nii.gz"]
    assert len(overlapped.finished_s) == 4 and overlapped.finished_s == sorted(overlapped.finished_s)
    for name in ("a", "d"):
        assert (tmp_path / "loop" / f"{name}.nii.gz").read_bytes() == (tmp_path / "overlapped" / f"{name}.nii.gz").read_bytes()
        reports = [json.loads((tmp_path / run / f"{name}_report.json").read_text()) for run in ("loop", "overlapped")]
        assert reports[0]["organs"] == reports[1]["organs"] and reports[0]["cascade"]["roi"] == reports[1]["cascade"]["roi"]
    # no partial files of the atomic writes; a second run skips every written case, in order
    assert sorted(p.name for p in (tmp_path / "overlapped").iterdir()) == sorted(p.name for p in (tmp_path / "loop").iterdir())
    again = segment_folder(cascade, folder, tmp_path / "overlapped", progress=False)
    assert again.skipped == loop.written and again.failed == loop.failed and not again.written
