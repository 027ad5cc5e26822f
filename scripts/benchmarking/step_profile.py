"""Where a training step reaches its peak memory: per phase (forward, backward, AdamW update) and, for a
memory-efficient IDM, per reversed step of the engine (docs/architecture.md, "Measuring"). It says which
working set limits the peak of the paper configuration.

With a ``micro_batch_size`` the step is followed through each micro-batch's forward and backward in turn.

Same measure as :mod:`~scripts.benchmarking.peak_memory` (a fresh process; CUDA allocator peak on a GPU, peak
RSS under ``MALLOC_MMAP_THRESHOLD_`` on the CPU; bytes above the post-warm-up baseline). The backward
pass is followed through hooks on the autograd nodes of the engine's steps: the peak is reset before
each step is reversed and read after it, so every reading belongs to one step (or, read at the next
step's start, to the nodes in between: the head, the stem, the time MLP).
"""

from __future__ import annotations

from functools import partial

import torch

from bundle.diffusion import micro_batches

from .child_process import FreshProcess, measuring_device
from .peak_memory import PeakMeter
from .report import markdown_table
from .workload import Workload, build_network, make_training_step

__all__ = ["profile_step_in_subprocess", "render_step_profile", "step_label"]

_ENGINE_NODE = "_ReconstructingStepBackward"


def step_label(step: torch.nn.Module) -> str:
    """``OnTensor(HalfCoupling)``, ``SkipSplit``: what an engine step does."""
    layer = getattr(step, "layer", None)
    return f"{type(step).__name__}({type(layer).__name__})" if layer is not None else type(step).__name__


def _engine_nodes(root) -> list:
    """The autograd nodes of the engine's steps reachable from ``root`` (each is its step's context)."""
    seen, stack, nodes = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == _ENGINE_NODE:
            nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def _hook_engine_steps(root, before, after) -> None:
    """``before(label, grad_outputs)`` and ``after(grad_inputs, grad_outputs)`` around each engine step's
    backward. No reference to a node outlives this call (a node holds its relay, and the relay the state
    rebuilt last, which would then count in the next phase)."""
    for node in _engine_nodes(root):
        node.register_prehook(partial(before, step_label(node.step)))
        node.register_hook(after)


def _profile(workload: Workload) -> dict:
    device = measuring_device()
    model = build_network(workload).to(device)
    training = make_training_step(workload, model, device)
    training.step()  # warm-up: gradients and AdamW state exist from here on
    meter = PeakMeter(device)
    training.optimizer.zero_grad(set_to_none=False)
    baseline = meter.reset()
    forward_peak = backward_peak = 0
    steps: list[dict] = []
    between = {"peak": 0}

    def before(label: str, grad_outputs) -> None:
        between["peak"] = max(between["peak"], meter.peak() - baseline)
        shapes = [tuple(g.shape[1:]) for g in grad_outputs if g is not None]
        steps.append({"step": label, "state": shapes, "before_bytes": meter.reset() - baseline})

    def after(grad_inputs, grad_outputs) -> None:
        steps[-1]["peak_bytes"] = meter.peak() - baseline
        meter.reset()

    for part in micro_batches(workload.batch_size, workload.micro_batch_size):
        meter.reset()
        loss = training.loss(part)
        forward_peak = max(forward_peak, meter.peak() - baseline)
        _hook_engine_steps(loss.grad_fn, before, after)
        meter.reset()
        loss.backward()
        del loss
        backward_peak = max(
            [backward_peak, between["peak"], meter.peak() - baseline, *(s["peak_bytes"] for s in steps)]
        )
    meter.reset()
    training.optimizer.step()
    update_peak = meter.peak() - baseline
    return {
        "forward_peak_bytes": forward_peak,
        "backward_peak_bytes": backward_peak,
        "update_peak_bytes": update_peak,
        "outside_engine_peak_bytes": between["peak"],
        "steps": steps,
        "device": device.type,
    }


def profile_step_in_subprocess(workload: Workload) -> dict:
    """The phase peaks and the per-step backward profile of ``workload``'s training step, in a fresh process.

    Keys: ``forward_peak_bytes``, ``backward_peak_bytes``, ``update_peak_bytes`` (each above the
    post-warm-up baseline), ``outside_engine_peak_bytes`` (backward nodes between engine steps), ``steps``
    (in backward order: ``step``, ``state`` shapes, ``before_bytes`` alive when the step starts and its
    ``peak_bytes``), ``device``; or ``error``.
    """
    return FreshProcess(_profile, workload).result()


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def render_step_profile(profile: dict, workload: Workload, command: str, machine: str, top: int = 12) -> str:
    """Markdown: the phase peaks, the ``top`` engine steps by peak, and the level-0 tensors that bound the
    peak of any engine that back-propagates the whole batch at once."""
    title = "# Peak memory of one training step, by phase and by engine step"
    header = (
        f"Command: `{command}`  \nMachine: {machine}  \nWorkload: channels {workload.channels}, "
        f"{workload.num_blocks} blocks per level, attention {workload.attention_levels}, batch "
        f"{workload.batch_size}"
        + (f" back-propagated {workload.micro_batch_size} at a time" if workload.micro_batch_size else "")
        + f", {workload.size}³, float32"
        + (", recompute_norms" if workload.recompute_norms else "")
    )
    if "error" in profile:
        return "\n\n".join([title, header, f"Not measured: {profile['error']}."]) + "\n"
    phases = markdown_table(
        ["phase", "peak above the post-warm-up baseline"],
        [
            ["forward (no activations stored)", _mb(profile["forward_peak_bytes"])],
            ["backward (reconstruction and gradients)", _mb(profile["backward_peak_bytes"])],
            [
                "  highest between engine steps (head, stem, time MLP; what is alive included)",
                _mb(profile["outside_engine_peak_bytes"]),
            ],
            ["AdamW update", _mb(profile["update_peak_bytes"])],
        ],
    )
    ranked = sorted(profile["steps"], key=lambda s: s["peak_bytes"], reverse=True)[:top]
    steps = markdown_table(
        ["step", "state (channels, size) per tensor", "alive at its start", "its working set", "peak"],
        [
            [
                s["step"],
                ", ".join(
                    f"{shape[0]} × {shape[1]}^{len(shape) - 1}" if len(shape) > 1 else str(shape)
                    for shape in s["state"]
                ),
                _mb(s["before_bytes"]),
                _mb(s["peak_bytes"] - s["before_bytes"]),
                _mb(s["peak_bytes"]),
            ]
            for s in ranked
        ],
    )
    samples = workload.micro_batch_size or workload.batch_size
    level0 = samples * workload.channels[0] * workload.size**workload.spatial_dims * 4
    bound = (
        f"A level-0 state tensor of this step is {_mb(level0)} (samples back-propagated at once × channels[0] × "
        "size³ × 4 B). Whatever the engine, when the backward pass reaches the trunk's output the output and its "
        f"gradient are both alive ({_mb(2 * level0)}), and the level-0 skip and its gradient stay alive while "
        "every deeper level is reversed. "
        + (
            "Below that, only back-propagating fewer samples at once (the trainer's `micro_batch_size`) or "
            "splitting the volume lowers the peak."
            if samples > 1
            else "Below that, only splitting the volume lowers the peak; of a coupling's working set, the network's "
            "`recompute_norms` leaves the convolutions' inputs and outputs."
        )
    )
    return (
        "\n\n".join(
            [
                title,
                header,
                "## Phases",
                phases,
                f"## Backward: the {len(ranked)} engine steps with the highest peak (of {len(profile['steps'])})",
                (
                    "*Alive at its start*: the memory in use above the baseline when the step begins (the states and "
                    "gradients of the levels not yet reversed, the skips, the trunk's inputs). *Its working set*: "
                    "what the "
                    "step adds at its peak (rebuilt tensors, the conditioner's recomputed activations, parameter "
                    "gradients)."
                ),
                steps,
                "## What bounds the peak",
                bound,
            ]
        )
        + "\n"
    )
