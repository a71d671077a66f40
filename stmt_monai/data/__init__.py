"""Training data: FLARE23-style triage into the paper's data categories (Fig. 1), datalists, and
the student's three-stream batches.

- :mod:`.triage`: sort cases into fully / partially / non-organ labelled and tumor annotated or
  not; write the datalists and the intensity fingerprint each bundle reads;
- :mod:`.datalists`: read datalists, build the student's stream-tagged list, attach each tumor
  case's region of interest;
- :mod:`.sampling`: :class:`~.sampling.StreamBatchSampler`, equal shares of the streams per batch.
"""
