"""Scoring by the official FLARE23 rules and FLARE-style efficiency.

- :mod:`.metrics`: DSC and NSD per class with FLARE's empty-mask and slice-range rules;
- :mod:`.scoring`: a folder of predictions against a folder of labels;
- :mod:`.efficiency`: wall time, CPU time, peak RSS and GPU memory of one process per case.
"""
