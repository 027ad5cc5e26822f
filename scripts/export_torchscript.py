"""Exports a trained IDM network to TorchScript (``model.ts``) and checks it against the eager network.

MONAI's ``python -m monai.bundle ckpt_export`` gives the traced network a single input, but the noise
predictor takes two (the noisy image and the timesteps), and scripting cannot compile its memory-saving
autograd function. Tracing under ``torch.no_grad()`` with both inputs works: without autograd the
network is a fixed sequence of tensor operations. This tool traces it that way and saves it with the
bundle metadata and config, as ``ckpt_export`` does.

The network and its input size come from the record of the training run beside the checkpoint (``run.json``).

Usage (from the bundle root):
    python scripts/export_torchscript.py --ckpt_file models/model.pt --filepath models/model.ts
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

from bundle.checkpoint import load_checkpoint
from bundle.errors import BadInputError, install_error_hook
from bundle.run_record import TrainedModel


def export(
    ckpt_file: str,
    filepath: str,
    config_file: str = "configs/inference.json",
    meta_file: str = "configs/metadata.json",
    tolerance: float = 1e-5,
) -> float:
    """Traces the network of ``ckpt_file`` (built from the ``run.json`` beside it) loaded with its weights and writes
    ``filepath``; returns the largest
    difference between the saved TorchScript module and the eager network on a fresh input (another
    batch size and other timesteps than the tracing example). Refuses an existing ``filepath``."""
    if Path(filepath).exists():
        raise BadInputError(f"{filepath} already exists; remove it or choose another --filepath.")
    if not Path(ckpt_file).is_file():
        raise BadInputError(
            f"Checkpoint {ckpt_file!r} does not exist. Pass --ckpt_file with the model.pt that training wrote "
            "(in its ckpt_dir)."
        )
    TrainedModel(ckpt_file)  # its record, before the config wraps a refusal in its own error
    parser = ConfigParser()
    parser.read_config(ROOT / config_file)
    parser.read_meta(ROOT / meta_file)
    parser["ckpt_path"] = str(ckpt_file)
    network = load_checkpoint(parser.get_parsed_content("network_def"), ckpt_file).eval()
    channels, size = network.in_channels, parser.get_parsed_content("spatial_size")
    with torch.no_grad():
        traced = torch.jit.trace(network, (torch.rand(1, channels, *size), torch.tensor([1])), check_trace=False)
        save_net_with_metadata(
            traced,
            filepath,
            include_config_vals=False,
            append_timestamp=False,
            meta_values=parser.get().get("_meta_", {}),
            more_extra_files={"inference.json": json.dumps(parser.get()).encode()},
        )
        reloaded = torch.jit.load(filepath)
        x, t = torch.rand(2, channels, *size) * 2 - 1, torch.tensor([7, 1500])
        difference = (reloaded(x, t) - network(x, t)).abs().max().item()
    if difference > tolerance:
        raise BadInputError(f"The exported {filepath} differs from the eager network by {difference} > {tolerance}.")
    print(f"wrote {filepath}; max |TorchScript − eager| = {difference:.3g}")
    return difference


if __name__ == "__main__":
    install_error_hook()
    fire.Fire(export)
