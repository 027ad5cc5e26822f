"""Plain-text helpers for benchmark reports: machine description, parameter breakdown, markdown tables."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bundle.networks import (
    CouplingFunction,
    InvertibleAttention,
    InvertibleDiffusionUNet,
    OrthogonalChannelMixing,
    OrthogonalDownsampling,
)

__all__ = ["machine_description", "markdown_table", "parameter_breakdown"]


def machine_description() -> str:
    """CPU model, core count, torch version and thread count (and the GPU, if any, with the precision its
    float32 convolutions and matrix products run in: cuDNN convolutions use TF32 by default)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ""
    if torch.cuda.is_available():
        convolutions = "TF32" if torch.backends.cudnn.allow_tf32 else "float32"
        matrix_products = "TF32" if torch.backends.cuda.matmul.allow_tf32 else "float32"
        gpu = (
            f", GPU {torch.cuda.get_device_name()} (convolutions in {convolutions}, matrix products in "
            f"{matrix_products})"
        )
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}{gpu}"
    )


def parameter_breakdown(model: InvertibleDiffusionUNet) -> dict[str, int]:
    """Parameters of an IDM grouped by layer kind (works on the meta device)."""
    kinds: list[tuple[str, type[nn.Module]]] = [
        ("coupling functions F, G", CouplingFunction),
        ("channel mixing", OrthogonalChannelMixing),
        ("learned resampling", OrthogonalDownsampling),
        ("invertible attention", InvertibleAttention),
    ]
    counts = {name: 0 for name, _ in kinds}
    for module in model.modules():
        for name, cls in kinds:
            if isinstance(module, cls):
                counts[name] += sum(p.numel() for p in module.parameters())
    counts["time MLP"] = sum(p.numel() for p in model.time_mlp.parameters())
    counts["stem and head"] = sum(p.numel() for m in (model.stem, model.head) for p in m.parameters())
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
