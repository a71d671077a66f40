"""Shared helpers of the bundle tests: each bundle's docs/README.md commands, run as written.

A README's commands are the lines of its ```bash blocks (``\\`` continuations joined) that start
with ``python -m monai.bundle``, ``torchrun`` or ``python scripts/``. :func:`readme_commands`
names each by what it runs (:func:`command_kind`); :func:`run_readme` runs one from the
repository root with ``--key value`` overrides (tiny sizes, temporary folders), one thread per
process (tiny networks gain nothing from more, and a shared CPU loses a lot to oversubscription).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from stmt_monai.bundle import format_override, override_args

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = REPO / "stmt_monai" / "resources" / "meta_schema_20240725.json"
#: every bundle of the repository
BUNDLE_NAMES = ("coarse_abdomen", "organ_selftrain", "tumor_meanteacher", "cascade")
#: a stage network a CPU test affords: 32^3 needs 3 down-samplings (5 would leave one voxel)
TINY = {"spatial_size": "[32,32,32]", "num_downsamplings": "3", "base_channels": "4", "num_workers": "0"}
#: what a CPU test affords: a 4-channel Res-UNet teacher on 32^3 windows of a 12 mm grid
TINY_TEACHER = {
    "teacher_kind": "res_unet_large",
    "teacher_roi_size": "[32,32,32]",
    "teacher_base_channels": "4",
    "teacher_num_downsamplings": "2",
    "teacher_spacing_mm": "[12,12,12]",
    "num_workers": "0",
}
#: what lets a tiny network learn in a few epochs of a tiny cohort: Adam at lr 0.01 (the bundles'
#: SGD at lr 0.01, momentum 0.99 still predicts all background after tens of iterations; with
#: this stage 1 reaches an abdomen Dice of 0.75 in 8 epochs and the organ student a liver Dice
#: of 0.42 in 3, measured on the shared tiny cohort)
TINY_OPTIMIZER = {"optimizer": "{'_target_': 'torch.optim.Adam', 'params': '$@network.parameters()', 'lr': 0.01}"}
#: environment of every command a test runs
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def config_default(bundle: str, key: str, workflow: str = "inference"):
    """A bundle config's own value of ``key`` (the paper's), not one recorded beside weights: the
    network keys read the record of ``models/model.pt`` when there is one
    (:func:`stmt_monai.bundle.recorded`), so this parses with no weights at ``model_path``."""
    from stmt_monai.bundle import workflow_parser

    parser = workflow_parser(BUNDLES / bundle, workflow, {"model_path": str(REPO / "no-such-weights.pt")})
    return parser.get_parsed_content(key)


def command_kind(args: list[str]) -> str:
    """What a README command runs: ``train``, ``evaluate``... (a ``run``'s last config file),
    ``torchrun multi_gpu_train``, ``verify_net_in_out <net_id>``, ``ckpt_export <net_id>``,
    ``verify_metadata`` or ``scripts/<name>.py``."""
    if args[0] == "python" and args[1].startswith("scripts/"):
        return args[1]
    start = args.index("monai.bundle") + 1
    action = args[start]
    if action == "run":
        configs = args[args.index("--config_file") + 1]
        kind = Path(re.findall(r"[\w/.-]+\.json", configs)[-1]).stem
        return f"torchrun {kind}" if args[0] == "torchrun" else kind
    if action in ("verify_net_in_out", "ckpt_export"):
        return f"{action} {args[start + 1]}"
    return action


def readme_commands(bundle: str) -> dict[str, list[str]]:
    """The commands of ``bundles/<bundle>/docs/README.md`` by kind, as argument lists, in README
    order; a kind seen again gets a number (``train 2``: the tumor bundle's FST command)."""
    text = (BUNDLES / bundle / "docs" / "README.md").read_text()
    commands: dict[str, list[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            args = shlex.split(command)
            runs_bundle = args[:3] == ["python", "-m", "monai.bundle"] or (args[:1] == ["torchrun"] and "monai.bundle" in args)
            runs_script = args[:1] == ["python"] and len(args) > 1 and args[1].startswith("scripts/")
            if not (runs_bundle or runs_script):
                continue
            kind, n = command_kind(args), 2
            name = kind
            while name in commands:
                name, n = f"{kind} {n}", n + 1
            commands[name] = args
    return commands


def with_overrides(args: list[str], **overrides) -> list[str]:
    """``args`` with each ``--key value`` replaced (or appended), values written as
    :func:`stmt_monai.bundle.bundle_command` writes them; ``python`` -> this interpreter,
    ``torchrun`` -> the one beside it."""
    exe = {"python": sys.executable, "torchrun": str(Path(sys.executable).parent / "torchrun")}
    args = [exe.get(a, a) if i == 0 or a == "python" else a for i, a in enumerate(args)]
    for key, value in overrides.items():
        flag = f"--{key}"
        if flag in args:
            args[args.index(flag) + 1] = format_override(value)
        else:
            args += override_args({key: value})
    return args


def run_readme(bundle: str, kind: str, timeout: float = 300, **overrides: str) -> str:
    """Run the README's ``kind`` command from the repository root with ``--key value`` overrides;
    its output (stdout + stderr). Fails the test if it exits with an error."""
    args = with_overrides(readme_commands(bundle)[kind], **overrides)
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def oracle_pseudo_labels(root: Path, prepared: Path, out: Path, max_cpl: int = 3, max_pl: int = 2) -> Path:
    """``stmt_monai.synthetic.oracle.oracle_pseudo_labels`` (the hidden truth as the organ teacher)
    with at most ``max_cpl`` and ``max_pl`` cases, to keep the tests short."""
    from stmt_monai.synthetic.oracle import oracle_pseudo_labels as oracle

    return oracle(root, prepared, out, max_per_stream={"cpl": max_cpl, "pl": max_pl})