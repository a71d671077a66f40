"""The two-stage cascade at inference (paper Fig. 2c) and what it writes.

- :mod:`.bundles`: a stage bundle's config, weights file and network;
- :mod:`.backends`: OpenVINO, ONNX Runtime and TorchScript runners of a stage network;
- :mod:`.stage`: :class:`~.stage.StageModel`, one stage ready to predict;
- :mod:`.cascade`: :class:`~.cascade.Cascade`, CT in, FLARE label map out;
- :mod:`.postprocessing`: largest connected component per organ, tumor over organs;
- :mod:`.batch`: a file, folder or DICOM series segmented case by case, outputs written atomically;
- :mod:`.report`, :mod:`.preview`: per-case volumes, HU and lesions; the PNG overlay;
- :mod:`.export`: TorchScript and ONNX exports of the stage networks.
"""
