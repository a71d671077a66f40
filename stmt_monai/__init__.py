"""stmt-monai: StMt (FLARE 2023) organ and pan-cancer segmentation in abdominal CT, as MONAI bundles.

Modules follow the pipeline: ``labels`` -> ``io`` -> ``preprocessing`` / ``transforms`` ->
``networks`` -> ``losses`` -> ``semisupervision`` -> ``engines`` / ``handlers`` -> ``inference``
-> ``postprocessing`` -> ``metrics``.
"""

__version__ = "0.1.0"
