"""Export a stage bundle's network beside its weights: ``model.ts`` (TorchScript, MONAI's
``ckpt_export``) and ``model.onnx`` (ONNX), which the cascade runs with ``--backend torchscript``
or ``--backend onnx``.

    python scripts/export.py bundles/organ_selftrain                      # models/model.ts, models/model.onnx
    python scripts/export.py bundles/tumor_meanteacher --weights demo     # models/demo/model.{ts,onnx}
    python scripts/export.py bundles/coarse_abdomen --formats onnx

ONNX needs the optional extra: ``pip install 'stmt-monai[export]'``.
"""

from __future__ import annotations

import logging

import fire

from stmt_monai.inference.export import FORMATS, export_bundle


def main(bundle_root: str, weights: str = "auto", formats: str | tuple = ",".join(FORMATS), check: bool = True) -> None:
    """Export ``bundle_root``'s network (``weights``: auto, trained or demo) in ``formats``
    (comma-separated: torchscript, onnx); with ``check`` log each export's largest difference
    from the eager network."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("stmt_monai").setLevel(logging.INFO)
    formats = formats.split(",") if isinstance(formats, str) else list(formats)
    for fmt, path in export_bundle(bundle_root, weights, formats, check).items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    fire.Fire(main)
