"""Predicts the memory of one training step of ``configs/train.json`` with any of its overrides, in seconds, without a
GPU and without reading or writing data (:mod:`bundle.memory_plan`: the trainer's iteration on FakeTensors).

Usage (from the bundle root):
    python scripts/plan_memory.py                                        # the default run, on this machine's device
    python scripts/plan_memory.py --spatial_size "[192,224,160]" --micro_batch_size 1 --device cuda \\
        --device_memory_gb 24                                          # a 24 GiB GPU that is not here
    python scripts/plan_memory.py --batch_size 8 --micro_batch_size auto --json true
    python scripts/plan_memory.py --device cuda --device_memory_gb 24 --memory_budget 0   # the least the run needs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from bundle.errors import BadInputError
from bundle.flags import as_flag
from bundle.memory_plan import plan_config


def main(
    config_file: str = str(BUNDLE_ROOT / "configs" / "train.json"), json_output: bool | str = False, **overrides
) -> None:
    """Prints the plan's table (or, with ``--json true``, one JSON object: ``peak_bytes``, ``floor_bytes``,
    ``params``, ``fits`` …); exits with status 1 when the step is predicted not to fit.

    Args:
        config_file: the training config.
        json_output: also ``--json``; ``true`` prints the JSON object only.
        overrides: any setting of the config, as for ``python -m monai.bundle run`` (``--spatial_size "[96,96,96]"``,
            ``--network_def#channels "[16,32,64]"``, ``--device cuda``, ``--device_memory_gb 24``,
            ``--micro_batch_size auto``).
    """
    as_json = as_flag(overrides.pop("json", json_output), "--json")
    if not Path(config_file).is_file():
        sys.exit(
            f"ERROR: --config_file {config_file!r} is not a file; give a training config such as "
            f"{BUNDLE_ROOT / 'configs' / 'train.json'}."
        )
    try:
        memory_plan = plan_config(config_file, overrides)
    except BadInputError as error:
        sys.exit(f"ERROR: {error}")
    plan = memory_plan.plan
    print(json.dumps(plan.to_json()) if as_json else plan.table())
    if plan.fits is False:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
