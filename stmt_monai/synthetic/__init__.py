"""A synthetic FLARE23-like cohort made from the one shipped real CT (tests, demo, ablation).

- :mod:`.config`: :class:`~.config.CohortConfig`, sizes and annotation policy;
- :mod:`.anatomy`: the source CT and its random deformation, field of view and contrast phase;
- :mod:`.tumors`: lesions in organs and outside them in the lower abdomen;
- :mod:`.case`: one case drawn from a seed;
- :mod:`.annotation`: the annotation policy and the cohort written in FLARE23's layout;
- :mod:`.preview`: a picture of example cases;
- :mod:`.oracle`: pseudo labels from the cohort's hidden truth (upper bounds, demo).
"""
