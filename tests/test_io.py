import nibabel as nib
import numpy as np
import pytest

from stmt_monai.io import ImageError, case_name, load_image, load_label, save_label_map


def _one_line_naming(err: ImageError, path) -> None:
    message = str(err)
    assert str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    path = tmp_path / "nothing_0000.nii.gz"
    with pytest.raises(ImageError, match="no such file") as err:
        load_image(path)
    _one_line_naming(err.value, path)


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), str(path))
    with pytest.raises(ImageError, match="3D volume") as err:
        load_image(path)
    _one_line_naming(err.value, path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes_0000.nii.gz"
    path.write_text("this is not a NIfTI file\nsecond line\n")
    with pytest.raises(ImageError, match="not a readable NIfTI") as err:
        load_image(path)
    _one_line_naming(err.value, path)
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(ImageError, match="unsupported file type"):
        load_image(other)


def test_label_shape_mismatch(real_ct, tmp_path):
    image, affine = load_image(real_ct)
    path = save_label_map(tmp_path / "case.nii.gz", np.zeros((10, 10, 10), np.uint8), affine)
    with pytest.raises(ImageError, match="differs from its image") as err:
        load_label(path, image.shape, affine)
    _one_line_naming(err.value, path)


def test_label_values_checked(real_ct, tmp_path):
    image, affine = load_image(real_ct)
    path = tmp_path / "bad_values.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, 20, np.uint8), affine), str(path))
    with pytest.raises(ImageError, match="outside the FLARE labels"):
        load_label(path, image.shape, affine)


def test_dicom_series_geometry(real_dicom):
    image, affine = load_image(real_dicom)
    assert image.shape == (512, 512, 20)
    assert np.allclose(np.abs(np.diag(affine)[:3]), [0.9765625, 0.9765625, 2.0])
    assert -1100 < image.min() < image.max() < 4000  # HU, rescale slope/intercept applied
    empty = real_dicom.parent / "abdomen_ct_3mm_organs.nii.gz"
    assert empty.exists()


def test_empty_folder_is_not_a_series(tmp_path):
    with pytest.raises(ImageError, match="no DICOM series"):
        load_image(tmp_path)


def test_case_name():
    assert case_name("a/FLARE23_0001_0000.nii.gz") == "FLARE23_0001"
    assert case_name("b/FLARE23_0002.nii.gz") == "FLARE23_0002"
    assert case_name("c/series_folder") == "series_folder"


def test_save_is_atomic_and_exact(real_ct, tmp_path):
    image, affine = load_image(real_ct)
    out = save_label_map(tmp_path / "sub" / "x.nii.gz", (image > 0).astype(np.uint8), affine)
    assert [p.name for p in out.parent.iterdir()] == ["x.nii.gz"]  # no temporary left behind
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8 and np.allclose(written.affine, affine)


def test_find_cases_one_rule_for_files_dicom_folders_and_hidden_names(real_ct, real_dicom, tmp_path):
    import shutil

    from stmt_monai.io import cases_by_name, find_cases, image_datalist

    assert find_cases(real_ct) == [real_ct]  # a file is one case
    assert find_cases(real_dicom) == [real_dicom]  # a folder that holds a DICOM series is one case
    shutil.copy(real_ct, tmp_path / "b_0000.nii.gz")
    shutil.copy(real_ct, tmp_path / "b.nii.gz")  # same case name as b_0000.nii.gz
    shutil.copytree(real_dicom, tmp_path / "a_dicom")
    (tmp_path / "c_series").symlink_to(real_dicom, target_is_directory=True)
    (tmp_path / ".b_0000.nii.gz.part.nii.gz").write_bytes(b"")  # an interrupted write: skipped
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()  # a folder without a DICOM series: not a case
    names = ["a_dicom", "b.nii.gz", "b_0000.nii.gz", "c_series"]
    assert find_cases(tmp_path) == [tmp_path / n for n in names]
    assert find_cases(tmp_path, dicom=False) == [tmp_path / "b.nii.gz", tmp_path / "b_0000.nii.gz"]  # label maps
    assert image_datalist(tmp_path) == [{"image": str(tmp_path / n)} for n in names]
    unique, shared = cases_by_name(find_cases(tmp_path))
    assert list(unique) == ["a_dicom", "c_series"] and list(shared) == ["b"] and len(shared["b"]) == 2
    with pytest.raises(ImageError, match="empty: holds no image"):
        find_cases(tmp_path / "empty")
    assert find_cases(tmp_path / "empty", allow_empty=True) == []
    with pytest.raises(ImageError, match="missing: no such file or folder"):
        find_cases(tmp_path / "missing")
