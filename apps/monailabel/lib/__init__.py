"""Inference and training tasks of the stmt-monai MONAI Label app (``apps/monailabel``)."""
