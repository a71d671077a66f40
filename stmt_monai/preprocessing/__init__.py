"""The one preprocessing path (paper section 2.1), shared by training, evaluation and inference.

- :mod:`.fingerprint`: foreground intensity statistics, clip and z-score;
- :mod:`.geometry`: canonical orientation, resizing, :class:`~.geometry.CaseGeometry` and its
  exact inverse :func:`~.geometry.restore_label_map`;
- :mod:`.roi`: the stage-2 region of interest, from a label (training) or stage 1's mask (inference);
- :mod:`.stage_input`: one stage's network input: orientation, crop, resize;
- :mod:`.transforms`: the same as MONAI dictionary transforms, plus the paper's augmentations.
"""
