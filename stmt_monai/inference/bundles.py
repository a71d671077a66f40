"""A stage bundle's inference config, weights file and demo weights, as the cascade and export read them.

- :data:`STAGE_BUNDLES`: the bundle of each stage (``coarse_abdomen``, ``organ_selftrain``,
  ``tumor_meanteacher``), found under :func:`default_bundles_dir`;
- :func:`bundle_config`: the bundle's parsed inference config, for its trained weights
  (``models/model.pt``) or its shipped demo weights (``configs/demo.json`` layered last, network
  and ``ckpt_dir`` of the reduced demo network); ``"auto"`` takes the trained ones when present;
- :func:`weights_path`, :func:`load_weights`, :func:`save_weights`: the ``model.pt`` a config
  points at, read as float32 (a bare state dict, or the entry ``inference_network`` of the
  mean teacher's ``{"student", "teacher"}``), written atomically (optionally fp16);
- :func:`write_demo_config`, :func:`random_weights`: the demo network's overrides, and random
  weights for tests and timing benchmarks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from stmt_monai.bundle import config_files, read_record, write_record
from stmt_monai.io import atomic_write
from stmt_monai.preprocessing.fingerprint import Fingerprint

if TYPE_CHECKING:  # imported where weights are read or written: the cascade's OpenVINO path never imports torch
    import torch

#: stage -> bundle folder name under ``bundles/``
STAGE_BUNDLES: Mapping[str, str] = {"abdomen": "coarse_abdomen", "organ": "organ_selftrain", "tumor": "tumor_meanteacher"}


#: override file of the shipped demo weights, layered last (``configs/demo.json``)
DEMO_CONFIG = "demo.json"


#: which weights a bundle's network is built for: ``auto`` (trained ``models/model.pt`` if there,
#: else the demo weights), ``trained``, ``demo``
WEIGHTS = ("auto", "trained", "demo")


def default_bundles_dir() -> Path:
    """The repository's ``bundles/`` folder next to the package (an editable install's checkout)."""
    return Path(__file__).resolve().parents[2] / "bundles"


# ----------------------------------------------------------------------------- bundles
def bundle_config(bundle_root: str | os.PathLike, weights: str = "auto"):
    """Read a stage bundle's inference configuration.

    Reads ``configs/inference.json`` (standalone, as MONAI tools read it) and, for the demo
    weights, ``configs/demo.json`` on top (:func:`stmt_monai.bundle.config_files`); ``bundle_root``
    is set to the absolute path so the bundle's relative ids (``ckpt_dir``, ``fingerprint``)
    resolve from any working directory.

    Which weights (``weights``):

    - ``"trained"``: the bundle's own ``models/model.pt`` (``model_path`` id if defined, else
      ``ckpt_dir``/model.pt), network as ``inference.json`` defines it (the paper's sizes);
    - ``"demo"``: ``configs/demo.json`` layered on top; it redefines the network's size keys
      (``base_channels``, ``num_downsamplings``, ``max_channels``, ``spatial_size``)
      and ``ckpt_dir`` (``models/demo``), exactly as ``stmt-train-demo`` trained them;
    - ``"auto"``: ``"trained"`` if the trained weights file exists, else ``"demo"`` if the bundle
      has ``configs/demo.json``, else ``"trained"`` (whose missing file is then reported). A fresh
      clone's ``models/model.pt`` is a link to the demo weights (so that MONAI tools, which look
      there, find them; :func:`is_shipped_demo`): that is ``"demo"``, not trained weights.

    Weights carry their network: the record beside the chosen weights (``models/model.json``,
    ``models/demo/model.json``; :func:`stmt_monai.bundle.read_record`), which every training
    writes with the network and input-size keys it was given, is applied last, so weights
    trained with ``--spatial_size [48,48,48] --base_channels 8`` load without those overrides.

    Returns:
        ``(parser, kind)``: the :class:`monai.bundle.ConfigParser` and ``"trained"`` or ``"demo"``.
    """
    from monai.bundle import ConfigParser

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    root = Path(bundle_root).resolve()
    configs = root / "configs"
    if not (configs / "inference.json").is_file():
        raise FileNotFoundError(f"{root}: not a stage bundle (no configs/inference.json)")
    demo_file = configs / DEMO_CONFIG

    def parse(extra: list[Path]):
        parser = ConfigParser()
        parser.read_config([str(f) for f in config_files(root, "inference")] + [str(f) for f in extra])
        parser["bundle_root"] = str(root)
        return parser

    kind = weights
    trained = weights_path(parse([]))
    if weights == "auto":
        kind = "trained"
        if (not trained.is_file() or is_shipped_demo(trained)) and demo_file.is_file():
            kind = "demo"
    elif weights == "trained" and is_shipped_demo(trained):
        raise FileNotFoundError(f"{trained}: no trained weights, only the link to the shipped demo weights (train the bundle, or use the demo weights)")
    if kind == "demo" and not demo_file.is_file():
        raise FileNotFoundError(f"{root}: no {DEMO_CONFIG} (demo weights not installed; run stmt-train-demo)")
    parser = parse([demo_file] if kind == "demo" else [])
    for key, value in read_record(weights_path(parser)).items():
        parser[key] = value
    return parser, kind


def load_network(bundle_root: str | os.PathLike, weights: str = "auto"):
    """A stage bundle's network with its weights loaded, eval mode, on the CPU: the one way the
    cascade (:class:`stmt_monai.inference.stage.StageModel`), the export and MONAI Label build it.

    The network is built from :func:`bundle_config` (the record beside the weights applied) and
    the weights loaded strictly (the tumor bundle's ``inference_network`` entry); weights that
    still do not fit raise a one-line :class:`stmt_monai.networks.WeightsMismatch`.

    Returns:
        ``(network, parser, kind)``: the module, the parsed config and ``"trained"`` / ``"demo"``.

    Raises:
        FileNotFoundError: no weights file (the message says how to make them).
    """
    from stmt_monai.networks import load_network_state

    parser, kind = bundle_config(bundle_root, weights)
    path = weights_path(parser)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no weights; train the bundle {Path(bundle_root).name} (stmt-train, or its docs/README.md) "
            "or make the demo weights (stmt-train-demo)"
        )
    network = parser.get_parsed_content("network_def")
    load_network_state(network, load_weights(path, parser.get("inference_network")), path)
    return network.eval(), parser, kind


def is_shipped_demo(weights: str | os.PathLike) -> bool:
    """Whether a bundle's ``models/model.pt`` is the link a fresh clone has to its shipped demo
    weights (``models/demo/model.pt``), rather than weights a training wrote."""
    path = Path(weights)
    return path.is_symlink() and path.resolve().parent == (path.parent / "demo").resolve()


def weights_path(parser) -> Path:
    """The weights file a parsed bundle config points at: ``model_path``, else ``<ckpt_dir>/model.pt``."""
    if "model_path" in parser:
        return Path(parser.get_parsed_content("model_path"))
    return Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"


def load_weights(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """A network's state dict from a bundle's ``model.pt``, as float32.

    ``model.pt`` may be a bare state dict (the model-zoo convention) or ``{name: state_dict}``
    (``BestCheckpoint`` with several objects, e.g. the mean teacher's ``{"student", "teacher"}``);
    ``key`` picks the entry (the tumor bundle's ``inference_network``), and a one-entry dict
    (``{"model": sd}``) is unwrapped. Half-precision tensors (the shipped demo weights are
    stored in fp16) are cast to float32.
    """
    import torch

    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if key is not None and key in checkpoint:
        checkpoint = checkpoint[key]
    elif key is not None and all(isinstance(v, Mapping) for v in checkpoint.values()):
        raise KeyError(f"{path}: no {key!r} entry (has {sorted(checkpoint)})")
    elif len(checkpoint) == 1 and isinstance(next(iter(checkpoint.values())), Mapping):
        checkpoint = next(iter(checkpoint.values()))
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in checkpoint.items()}


def write_demo_config(bundle_root: str | os.PathLike, settings: Mapping) -> Path:
    """Write a bundle's ``configs/demo.json``: the overrides of its demo network.

    ``settings`` holds bundle ids (``base_channels``, ``num_downsamplings``, ``spatial_size``,
    ``max_channels``, ...); ``ckpt_dir`` is set to ``models/demo`` so the demo
    weights and fingerprint never mix with trained ones in ``models/``. Training with this file
    layered (``stmt-train-demo``) and :func:`bundle_config` (``weights="demo"``) then build
    the same network.
    """
    from stmt_monai.io import write_text_atomic

    config = {"ckpt_dir": "$@bundle_root + '/models/demo'", **dict(settings)}
    return write_text_atomic(Path(bundle_root) / "configs" / DEMO_CONFIG, json.dumps(config, indent=4) + "\n")


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor], key: str | None = None, half: bool = False) -> Path:
    """Write a state dict as a bundle's ``model.pt`` (atomically).

    Args:
        path: output file.
        state: the network's state dict.
        key: store as ``{key: state}`` (the tumor bundle's ``inference_network``), else bare.
        half: store floating-point tensors as fp16 (the demo weights; :func:`load_weights`
            casts them back to fp32).
    """
    import torch

    converted: dict = {}

    def convert(v: torch.Tensor) -> torch.Tensor:
        # one copy per shared tensor (DynUNet lists its blocks twice in its state dict), as torch.save does
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride())
        if key not in converted:
            converted[key] = v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()
        return converted[key]

    state = {k: convert(v) for k, v in state.items()}
    with atomic_write(path) as tmp:
        torch.save({key: state} if key else state, tmp)
    return Path(path)


def random_weights(bundle_root: str | os.PathLike, fingerprint: Fingerprint, weights: str = "demo", seed: int = 0) -> Path:
    """Give a bundle randomly initialised weights and a fingerprint (tests and timing benchmarks).

    Builds the bundle's network as :func:`bundle_config` does for ``weights`` and writes its
    initial state to the weights path (a bare state dict, as the model zoo stores ``model.pt``)
    and ``fingerprint`` beside it.
    """
    import torch

    parser, _ = bundle_config(bundle_root, weights)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    path = weights_path(parser)
    fingerprint.save(parser.get_parsed_content("fingerprint"))
    write_record(path, network_record(parser))
    return save_weights(path, network.state_dict())


#: the config ids a stage network and its input are built from: what a training records beside
#: its weights (the ``record`` of ``validate#best_checkpoint`` in each stage bundle's train.json)
NETWORK_KEYS = ("spatial_size", "in_channels", "out_channels", "base_channels", "num_downsamplings", "max_channels")


def network_record(parser) -> dict:
    """The :data:`NETWORK_KEYS` values of a parsed stage-bundle config (a weights record)."""
    return {key: parser.get_parsed_content(key) for key in NETWORK_KEYS if key in parser}


def random_weight_bundles(
    dest: str | os.PathLike,
    fingerprint: Fingerprint,
    weights: str = "trained",
    settings: Mapping | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Copies of the three stage bundles' configs with randomly initialised weights, for tests
    and timing benchmarks (the weights do not change a network's cost; the repository's
    ``bundles/`` is never written to).

    Args:
        dest: the folder that gets one sub-folder per stage bundle (a ``bundles_dir`` of the
            cascade).
        fingerprint: the intensity fingerprint written beside each network's weights.
        weights: ``"trained"``: the configs' own networks (the paper's sizes); ``"demo"``: the
            demo networks (each bundle's ``configs/demo.json``).
        settings: network overrides (``base_channels``, ``spatial_size``, ...) written as every
            bundle's ``configs/demo.json`` (:func:`write_demo_config`); implies ``"demo"``.
        source: the folder of the bundles copied; default :func:`default_bundles_dir`.

    Returns:
        ``dest``.
    """
    import shutil

    dest, source = Path(dest), Path(source) if source is not None else default_bundles_dir()
    weights = "demo" if settings is not None else weights
    for seed, name in enumerate(STAGE_BUNDLES.values()):
        shutil.rmtree(dest / name, ignore_errors=True)
        ignore = shutil.ignore_patterns(DEMO_CONFIG) if weights == "trained" else None
        shutil.copytree(source / name / "configs", dest / name / "configs", ignore=ignore)
        if settings is not None:
            write_demo_config(dest / name, settings)
        random_weights(dest / name, fingerprint, weights=weights, seed=seed)
    return dest
