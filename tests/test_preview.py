"""stmt_monai.inference.preview: the overlay's pixels carry each label's colour where the label is."""

import numpy as np
from matplotlib.image import imread

from stmt_monai.inference.preview import LABEL_COLORS, SOFT_TISSUE_WINDOW, overlay_figure


def test_axial_preview_paints_the_liver_in_its_colour_on_the_patients_right(tmp_path):
    """A black CT (the window's floor) whose liver fills the patient's right half (RAS: high x):
    in the axial panel, radiological convention, the liver's colour (blended at the default
    opacity over black) fills the viewer's left half and nothing else in the panel has it."""
    shape = (40, 30, 20)
    image = np.full(shape, SOFT_TISSUE_WINDOW[0], np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[20:, :, :] = 1  # liver (label 1): x >= 20, the patient's right in RAS
    png = overlay_figure(image, labels, tmp_path / "preview.png", affine=np.eye(4), views=("axial",), alpha=0.45)
    rgb = imread(png)[..., :3]
    liver = np.all(np.abs(rgb - 0.45 * np.asarray(LABEL_COLORS[1])) < 0.02, axis=-1)  # blended over black
    black = np.all(rgb < 0.02, axis=-1)
    rows, cols = np.nonzero(liver)
    assert rows.size > 500, "no pixel carries the liver's colour"
    row = int(np.median(rows))
    panel = np.flatnonzero(liver[row] | black[row])  # the panel's pixels on that row: liver or black CT
    left, right = panel.min(), panel.max()
    middle = (left + right) / 2
    # (a few pixels spared at the panel's frame and at the liver's edge, drawn antialiased)
    assert liver[row, left + 3 : int(middle) - 1].all()  # the viewer's left half: the liver
    assert black[row, int(middle) + 2 : right - 2].all() and not liver[row, int(middle) + 2 :].any()  # the right half: the CT
    # another label would show in another colour: no pixel of the panel has the kidney's
    kidney = np.all(np.abs(rgb - 0.45 * np.asarray(LABEL_COLORS[2])) < 0.02, axis=-1)
    assert not kidney[rows.min() : rows.max() + 1, left : right + 1].any()
