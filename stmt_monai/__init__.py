"""stmt-monai: StMt (FLARE 2023) organ and pan-cancer segmentation in abdominal CT, as MONAI bundles.

Sub-packages follow the pipeline, as nnU-Net's do: ``labels`` and ``io`` (the label table, CT and
DICOM files) -> ``data`` (triage into the paper's data categories, datalists, stream batches) ->
``preprocessing`` (fingerprint, geometry, region of interest, transforms) -> ``networks`` ->
``training`` (losses, self-training, pseudo labels, mean teacher, engines, handlers) ->
``inference`` (bundles, backends, the cascade, post-processing, batch runs, reports) ->
``evaluation`` (FLARE metrics, scoring, efficiency); ``synthetic`` makes the generated cohort of
the tests, the demo and the ablation. ``docs/paper_to_code.md`` maps each step of the paper to its
code.
"""

__version__ = "0.1.0"
