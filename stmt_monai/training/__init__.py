"""Training of the StMt networks (paper section 2.2, Fig. 2a and 2b, Table 2).

- :mod:`.losses`: Dice + CE per stream and the weighted sums of eq. (1) and (2);
- :mod:`.self_training`: correction of the teacher's pseudo labels with partial annotations;
- :mod:`.pseudo_label`: the teacher's pseudo-label job (self-training step 2);
- :mod:`.mean_teacher`: the EMA teacher and its real-time corrected target;
- :mod:`.engines`: MONAI trainers for eq. (1) and eq. (2);
- :mod:`.handlers`: resumable and best checkpoints, validation, loss logging;
- :mod:`.distributed`: torchrun set-up for multi-GPU training.
"""
