"""What a training step needs in memory, known before the run starts: the configured trainer's iteration is run on
FakeTensors (shapes, dtypes and devices without storage: no GPU, no data and no time beyond the Python of one
step), while a ``TorchDispatchMode`` adds up the bytes of the storages alive after every operation.

The step is the trainer's own (:class:`~bundle.diffusion.IDMTrainer`: noise, Eq. 8 loss and its backward in
micro-batches, AdamW, EMA), run on fake twins of the network, the optimizer and the EMA model after a warm-up that
leaves what a first step would (gradients, the optimizer's state, the EMA's first update): the planned step is the
steady state, in which all of them are alive throughout.
The engine really runs, so its in-place reconstruction and its one-step-at-a-time backward are what is counted.

What a FakeTensor cannot show is left out and said: memory an operator takes for itself (a convolution library's
workspace, the CPU's oneDNN buffers, ~30 MB of a CPU process's caches and generated code), the CUDA context
(outside the allocator: :data:`CUDA_HEADROOM_BYTES` is kept free for it and the allocator's slack), and the
allocator's fragmentation. On a GPU each storage is rounded up to the allocator's 512-byte blocks, as
``torch.cuda.max_memory_allocated`` counts them.
"""

from __future__ import annotations

import copy
import gc
import inspect
import itertools
import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .errors import BadInputError, bad_input_in
from .utils import unwrap

# torch's own deepcopy of a FakeTensor reads its data pointer (harmless, and deprecated with a warning)
_FAKE_DATA_POINTER = "Accessing the data pointer of FakeTensor is deprecated"

__all__ = [
    "AUTO_MARGIN",
    "CUDA_HEADROOM_BYTES",
    "LiveBytes",
    "MemoryPlan",
    "TrainingMemoryPlan",
    "check_micro_batch_size",
    "device_memory_bytes",
    "plan_config",
    "plan_sampling_step",
    "plan_training_step",
    "warm_up",
]

logger = logging.getLogger(__name__)

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator's rounding of every block
CUDA_HEADROOM_BYTES = 2**30  # kept free on a GPU: the CUDA context, library workspaces, the allocator's slack
AUTO_MARGIN = 0.1  # memory_budget "auto" leaves this share of the spare memory unspent
GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages on ``device_type`` alive after each operation, their peak, and where it was reached.

    A storage is counted once (views share it) from the operation that made it until it is freed (a weak reference's
    callback); :meth:`alive_at_peak` lists those alive at the step's peak that the step made. Where: the phase
    (:meth:`set_phase`: ``"forward"``, ``"update"`` …) or, inside a backward pass, ``"backward"``; and the module
    whose forward ran last (in a memory-efficient backward: the block being recomputed) or else the autograd node
    running.

    Args:
        device_type: the device whose storages count (``"cuda"``: the noise drawn on the CPU does not).
        block_bytes: each storage is rounded up to a multiple of this (the CUDA allocator's 512).
        module_names: ``{id(module): name}`` of the modules to name in :attr:`peak_where`.
        onednn_workspaces: count the CPU convolutions' hidden workspaces (:meth:`_workspace`) at each one's
            peak: a CPU plan's, not a GPU plan's run with the CPU's operators.
    """

    def __init__(
        self,
        device_type: str,
        block_bytes: int = 1,
        module_names: dict[int, str] | None = None,
        onednn_workspaces: bool = False,
    ) -> None:
        super().__init__()
        self.device_type = device_type
        self.onednn_workspaces = onednn_workspaces
        self.block_bytes = block_bytes
        self.module_names = module_names or {}
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage → [its counted bytes, what made it]
        self.live = 0
        self.peak = 0
        self.peak_where = ("", "")
        self._alive_at_peak: list[tuple[int, tuple]] = []  # (bytes, what made it) of the storages at the peak
        self._snapshot_bytes = 0
        self.phase = "build"  # until start_step
        self.phase_peaks: dict[str, int] = {}
        self._module = ""
        self._task = -1
        self._hooks: list = []

    def __enter__(self) -> Self:
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._entered)]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def _entered(self, module: nn.Module, args) -> None:
        name = self.module_names.get(id(module))
        if name is not None:
            self._module = name

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes) * self.block_bytes

    def _freed(self, size: list[int]) -> None:
        self.live -= size[0]

    def _count(self, tensor: torch.Tensor, made_by: tuple[str, str, str] | None = None) -> None:
        """Counts ``tensor``'s storage; ``made_by``: (phase, operator, module) of a new one."""
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        nbytes = self._rounded(storage.nbytes())
        size = self._sizes.get(storage)
        if size is None:  # a new storage: counted until it is freed
            size = self._sizes[storage] = [
                0,
                (*(made_by or (self.phase, "", "")), str(tensor.dtype).removeprefix("torch."), list(tensor.shape)),
            ]
            weakref.finalize(storage, self._freed, size)
        self.live += nbytes - size[0]  # (a storage resized in place by an out= operation changes its size)
        size[0] = nbytes

    def count(self, tensors) -> None:
        """Counts ``tensors`` that no operator has made yet (a no-op for those it has)."""
        for t in tensors:
            self._count(t)

    def start_step(self) -> None:
        """Forgets the peaks so far: what follows is the step (phase ``"forward"`` until :meth:`set_phase`)."""
        self.peak, self.peak_where, self.phase_peaks, self._alive_at_peak = self.live, ("", ""), {}, []
        self._snapshot_bytes = 0
        self.set_phase("forward")

    def alive_at_peak(self, count: int = 8) -> list[dict]:
        """The ``count`` largest groups of storages alive at the step's peak that the step made (what was alive
        before it, the floor, left out), largest first: ``{"bytes", "count", "made_by", "where", "dtype",
        "shape"}`` (``made_by``: the operator; ``where``: phase and module, as in :attr:`peak_where`), storages of
        one operator, place, dtype and shape grouped."""
        groups: dict[tuple, list[int]] = {}
        for nbytes, (phase, op, module, dtype, shape) in self._alive_at_peak:
            group = groups.setdefault((op, f"{phase}, {module}" if module else phase, dtype, str(shape)), [0, 0])
            group[0] += nbytes
            group[1] += 1
        ordered = sorted(groups.items(), key=lambda item: -item[1][0])[:count]
        return [
            {"bytes": b, "count": n, "made_by": op, "where": where, "dtype": dtype, "shape": shape}
            for (op, where, dtype, shape), (b, n) in ordered
        ]

    def set_phase(self, phase: str) -> None:
        """Names what runs from now on outside a backward pass (and forgets the module of the phase before)."""
        self.phase, self._module = phase, ""

    def where(self) -> tuple[str, str]:
        """(phase, module or autograd node) of the operation running now."""
        task = torch._C._current_graph_task_id()  # -1 outside a backward pass
        if task != -1 and self._task == -1:  # a backward pass begins: the forward's last module is not its place
            self._module = ""
        self._task = task
        if task == -1:
            return self.phase, self._module
        node = torch._C._current_autograd_node()
        return "backward", self._module or (type(node).__name__ if node is not None else "")

    def _workspace(self, func, args) -> int:
        """Bytes an operator allocates and frees inside itself, unseen by dispatch. On the CPU, oneDNN's convolution
        reorders its operands into a channel-blocked layout, the channels rounded up to a multiple of 16: a copy of
        the input in the forward, of the input and the output's gradient in the backward (measured per operator:
        16.7 MB hidden in the backward of a 4-channel convolution of batch 4 at 32³, whose operands hold 2.1 MB
        each)."""
        if not self.onednn_workspaces:
            return 0
        if func is torch.ops.aten.convolution.default:
            operands = args[:1]
        elif func is torch.ops.aten.convolution_backward.default:
            operands = args[:2]
        else:
            return 0
        return sum(self._rounded(t.nbytes // t.shape[1] * -(-t.shape[1] // 16) * 16) for t in operands)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        workspace = self._workspace(func, args)
        out = func(*args, **(kwargs or {}))
        phase, module = self.where()
        made_by = (phase, str(func.overloadpacket.__name__), module)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf, made_by)
        level = self.live + workspace  # the workspace is freed before the operator returns, its outputs made
        if level > self.phase_peaks.get(phase, -1):
            self.phase_peaks[phase] = level
        if level > self.peak:
            if self.phase != "build" and level > self._snapshot_bytes * 1.001:  # (again once it has grown)
                self._alive_at_peak = [
                    (size[0], size[1]) for size in self._sizes.values() if size[1][0] != "build" and size[0]
                ]
                if workspace:
                    self._alive_at_peak.append((workspace, (phase, "workspace", module, "", [])))
                self._snapshot_bytes = level
            self.peak, self.peak_where = level, (phase, module)
        return out


def _tensor_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def _tensors_in(value, depth: int = 3):
    """The tensors in ``value`` and in the dicts, lists and tuples it holds (``depth`` levels deep)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth - 1)
    elif depth and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth - 1)


def _fake_twin(module: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``module`` whose tensors are new (fake, under the active FakeTensorMode) empty tensors on
    ``device`` of the same shapes and dtypes: its parameters (``requires_grad`` kept; shared ones stay shared), its
    buffers and the tensors its modules hold otherwise (caches, MONAI's attention matrices kept for display)."""
    memo: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
    held = (
        t
        for m in module.modules()
        for key, value in vars(m).items()
        if key not in ("_parameters", "_modules")
        for t in _tensors_in(value)
    )
    for t in itertools.chain(module.buffers(), held):
        if id(t) not in memo:
            memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
    return copy.deepcopy(module, memo)


def warm_up(
    network: nn.Module, optimizer: torch.optim.Optimizer, ema: torch.optim.swa_utils.AveragedModel | None
) -> None:
    """What a first training step leaves behind, without its cost: gradients, the optimizer's state and the EMA's
    first update, so that the step planned next is the steady state (all of them alive throughout)."""
    for p in network.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    if ema is not None:
        ema.update_parameters(network)


def _twin_ema(
    ema: torch.optim.swa_utils.AveragedModel, network: nn.Module, device: torch.device
) -> torch.optim.swa_utils.AveragedModel:
    """An EMA of ``network`` with ``ema``'s settings. Its copy of the network is made again by :func:`_fake_twin`: the
    storages of ``AveragedModel``'s deep copy are made without an operator, and FakeTensors do not keep their
    identity through later views."""
    twin = torch.optim.swa_utils.AveragedModel(
        network, avg_fn=ema.avg_fn, multi_avg_fn=ema.multi_avg_fn, use_buffers=ema.use_buffers
    )
    twin.module = _fake_twin(twin.module, device)
    return twin


def _kept_tensors(
    network: nn.Module, optimizer: torch.optim.Optimizer, ema: torch.optim.swa_utils.AveragedModel | None
) -> dict[str, list[torch.Tensor]]:
    """The tensors kept between steps, by kind: ``parameter_bytes`` (and buffers), ``gradient_bytes``,
    ``optimizer_bytes`` and ``ema_bytes``."""
    return {
        "parameter_bytes": [*network.parameters(), *network.buffers()],
        "gradient_bytes": [p.grad for p in network.parameters() if p.grad is not None],
        "optimizer_bytes": [
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ],
        "ema_bytes": [] if ema is None else list(ema.state_dict().values()),
    }


def _twin_optimizer(optimizer: torch.optim.Optimizer, twins: dict[int, nn.Parameter]) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and settings over the twins of its parameters."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [twins[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return type(optimizer)(groups, **defaults)


@dataclass
class MemoryPlan:
    """The predicted memory of one training step (bytes), see :func:`plan_training_step`.

    ``peak_bytes``: all tensors alive at the step's peak; ``floor_bytes``: what stays alive between steps
    (``parameter_bytes`` + ``gradient_bytes`` + ``optimizer_bytes`` + ``ema_bytes``); ``phase_peaks``: the peak
    during the forward pass, the backward pass and the update; ``peak_phase`` and ``peak_module``: where the
    peak is reached; ``alive_at_peak``: the largest of the step's own tensors alive then, above the floor
    (:meth:`LiveBytes.alive_at_peak`); ``usable_bytes``: the device memory the peak must fit in (None: unknown);
    ``fits``; ``memory_budget``: the bytes of activations the network's memory-efficient forward keeps;
    ``optimizer_in_backward``: the update ran inside backward.
    """

    device: str
    batch_size: int
    micro_batch_size: int | None
    image_shape: list[int]
    amp: bool
    params: int
    peak_bytes: int
    floor_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    phase_peaks: dict[str, int]
    peak_phase: str
    peak_module: str
    usable_bytes: int | None
    fits: bool | None
    seconds: float
    alive_at_peak: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory_budget: float = 0.0
    optimizer_in_backward: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The plan as a text table, for the log and the command line."""
        samples = self.micro_batch_size or self.batch_size
        rows = [
            (
                "step",
                f"batch {self.batch_size}"
                + (f" in micro-batches of {self.micro_batch_size}" if self.micro_batch_size else "")
                + f", {samples} × {self.image_shape}, "
                + ("bf16 autocast" if self.amp else "float32")
                + f" on {self.device}",
            ),
            ("parameters", f"{self.params:,}"),
            (
                "activations kept (memory_budget)",
                "none"
                if not self.memory_budget
                else "all"
                if math.isinf(self.memory_budget)
                else _gb(int(self.memory_budget)).strip() + " at most",
            ),
            ("update", "inside backward (optimizer_in_backward)" if self.optimizer_in_backward else "after backward"),
            ("weights (and buffers)", _gb(self.parameter_bytes)),
            ("gradients", _gb(self.gradient_bytes)),
            ("optimizer state", _gb(self.optimizer_bytes)),
            ("EMA weights", _gb(self.ema_bytes)),
            ("floor (kept between steps)", _gb(self.floor_bytes)),
            *((f"peak during {phase}", _gb(value)) for phase, value in self.phase_peaks.items()),
            ("peak of the step", _gb(self.peak_bytes)),
            ("reached in", f"{self.peak_phase}" + (f", at {self.peak_module}" if self.peak_module else "")),
            ("usable memory", "unknown" if self.usable_bytes is None else _gb(self.usable_bytes)),
            ("fits", {True: "yes", False: "NO", None: "unknown"}[self.fits]),
        ]
        width = max(len(k) for k, _ in rows)
        alive = [
            f"  {_gb(t['bytes'])}  {t['count']} × {t['dtype']} {t['shape']} from {t['made_by']} ({t['where']})"
            for t in self.alive_at_peak
        ]
        return "\n".join(
            [f"{k:<{width}}  {v}" for k, v in rows]
            + (["alive at the peak above the floor (largest first):", *alive] if alive else [])
            + [f"note: {n}" for n in self.notes]
        )


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:8.3f} GB"


def device_memory_bytes(device: torch.device | str, device_memory_gb: float | None = None) -> int | None:
    """Memory a run on ``device`` may use: ``device_memory_gb`` GiB (or a GPU's total memory) less
    :data:`CUDA_HEADROOM_BYTES` on a GPU; on the CPU ``device_memory_gb`` GiB or the memory available now
    (``MemAvailable``); None where unknown (a GPU that is not here, with no ``device_memory_gb``)."""
    kind = torch.device(device).type
    if device_memory_gb is not None:
        if (
            isinstance(device_memory_gb, bool)
            or not isinstance(device_memory_gb, (int, float))
            or not device_memory_gb > 0
        ):
            raise BadInputError(
                f"device_memory_gb must be a positive number of GiB such as 24; got {device_memory_gb!r}."
            )
        total = int(device_memory_gb * GIB)
    elif kind == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    elif kind == "cpu" and Path("/proc/meminfo").exists():
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    else:
        return None
    return total - CUDA_HEADROOM_BYTES if kind == "cuda" else total


def _planning_device(
    device: torch.device | str, network: nn.Module, image_shape: Sequence[int]
) -> tuple[str, torch.device, list[str]]:
    """(the planned device's kind, the device of the fake tensors, the plan's notes) for a plan of ``network`` on
    images of ``image_shape`` (C, *S): without a GPU a CUDA plan runs the CPU's operators, and says so; a size the
    network pads inside is said too."""
    kind, device = torch.device(device).type, torch.device(device)
    notes = [
        "predicted, not measured: tensors only (no operator workspaces, CUDA context or fragmentation)"
        if kind == "cuda"
        else "predicted, not measured: tensors and oneDNN's convolution workspaces (no other library buffers)"
    ]
    padded_size = getattr(network, "padded_size", None)
    if padded_size is not None and list(padded_size(image_shape[1:])) != list(image_shape[1:]):
        padded = list(padded_size(image_shape[1:]))
        notes.append(
            f"the network pads {list(image_shape[1:])} to {padded} inside (its levels need multiples of "
            f"{network.size_divisor}): the step costs what {padded} costs; a spatial_size of multiples "
            "of it uses every voxel it pays for"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        # fake CUDA tensors need CUDA's operators (e.g. to choose an attention kernel)
        notes.append(
            "planned with the CPU's operators: no GPU here (a GPU's attention and convolution kernels "
            "may keep other working sets)"
        )
        device = torch.device("cpu")
    return kind, device, notes


def plan_training_step(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    noise_sampler,
    *,
    batch_size: int,
    image_shape: Sequence[int],
    micro_batch_size: int | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    amp: bool = False,
    lambda_rec: float = 0.0,
    lambda_l2: float = 1e-4,
    device: torch.device | str = "cpu",
    usable_bytes: int | None = None,
    condition_channels: int = 0,
    optimizer_in_backward: bool = False,
) -> MemoryPlan:
    """Predicts the memory of one training step of :class:`~bundle.diffusion.IDMTrainer` with these arguments,
    without touching ``network``, ``optimizer``, ``ema`` or ``noise_sampler`` (real, meta or fake: only their
    shapes and settings are read) and without allocating their memory.

    Args:
        network, optimizer, scheduler, noise_sampler, micro_batch_size, ema, amp, lambda_rec, lambda_l2: as the
            trainer's.
        batch_size: samples per step; image_shape: (C, *S) of one sample.
        device: where the run trains (its kind decides the allocator's rounding).
        usable_bytes: the memory the peak must fit in (:func:`device_memory_bytes`), or None.
        condition_channels: a conditioned model's given modalities (K: the batch's ``condition`` is (B, K, *S)).
        optimizer_in_backward: the update runs inside backward (no gradients kept between steps).

    The network's ``memory_budget`` (activations its memory-efficient forward keeps) is planned as it is set.
    """
    from .diffusion.engines import IDMTrainer  # the trainer imports this module's caller, not this module

    start = time.perf_counter()
    network = unwrap(network)
    kind, device, notes = _planning_device(device, network, image_shape)
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", _FAKE_DATA_POINTER)
        tracker = LiveBytes(device.type, CUDA_BLOCK_BYTES if kind == "cuda" else 1, onednn_workspaces=kind == "cpu")
        with tracker:
            twin = _fake_twin(network, device)
            twins = dict(zip(map(id, network.parameters()), twin.parameters(), strict=True))
            twin_optimizer = _twin_optimizer(optimizer, twins)
            twin_ema = None if ema is None else _twin_ema(ema, twin, device)
            tracker.module_names = {id(m): name or "network" for name, m in twin.named_modules()}
            trainer = IDMTrainer(
                device=device,
                max_epochs=1,
                train_data_loader=[],
                network=twin,
                optimizer=twin_optimizer,
                scheduler=scheduler,
                noise_sampler=copy.copy(noise_sampler),
                lambda_rec=lambda_rec,
                lambda_l2=lambda_l2,
                micro_batch_size=micro_batch_size,
                ema=twin_ema,
                amp=amp,
                decollate=False,
                optimizer_in_backward=optimizer_in_backward,
            )
            warm_up(twin, twin_optimizer, twin_ema)
            if optimizer_in_backward:  # its step leaves no gradients behind
                for p in twin.parameters():
                    p.grad = None
            kept = _kept_tensors(twin, twin_optimizer, twin_ema)
            tracker.count(itertools.chain.from_iterable(kept.values()))  # (a no-op unless no operator made one)
            tracker.start_step()
            trainer.optimizer.register_step_pre_hook(lambda *_: tracker.set_phase("update"))
            images = torch.zeros(batch_size, *image_shape, device=device)
            batch = {"image": images}
            if condition_channels:
                batch["condition"] = torch.zeros(batch_size, condition_channels, *image_shape[1:], device=device)
                notes.append(
                    f"conditioned on {condition_channels} given channel(s) beside the {image_shape[0]} generated ones"
                )
            trainer._iteration(trainer, batch)
            floor = {
                name: _tensor_bytes(tensors) for name, tensors in _kept_tensors(twin, twin_optimizer, twin_ema).items()
            }
            params = sum(p.numel() for p in twin.parameters())
            del trainer, twin, twins, twin_optimizer, twin_ema, images, batch, kept
    gc.collect()
    fits = None if usable_bytes is None else tracker.peak <= usable_bytes
    return MemoryPlan(
        device=kind,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        image_shape=list(image_shape),
        amp=bool(amp),
        params=params,
        peak_bytes=tracker.peak,
        floor_bytes=sum(floor.values()),
        **floor,
        phase_peaks={k: tracker.phase_peaks[k] for k in ("forward", "backward", "update") if k in tracker.phase_peaks},
        peak_phase=tracker.peak_where[0],
        peak_module=tracker.peak_where[1],
        usable_bytes=usable_bytes,
        fits=fits,
        seconds=time.perf_counter() - start,
        alive_at_peak=tracker.alive_at_peak(),
        notes=notes,
        memory_budget=float(getattr(network, "memory_budget", 0.0)),
        optimizer_in_backward=optimizer_in_backward,
    )


def plan_sampling_step(
    network: nn.Module, batch_size: int, image_shape: Sequence[int], device: torch.device | str = "cpu"
) -> MemoryPlan:
    """Predicts the memory of one sampling step (one evaluation of ``network`` without gradients, as every DDPM or
    DDIM step makes, on ``batch_size`` samples of ``image_shape`` (C, *S)), like :func:`plan_training_step`: the
    weights, the sample and the noise estimate, and the forward pass's working set. There is no optimizer or
    EMA in sampling (the EMA weights are the network's)."""
    start = time.perf_counter()
    network = unwrap(network)
    kind, device, notes = _planning_device(device, network, image_shape)
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", _FAKE_DATA_POINTER)
        tracker = LiveBytes(device.type, CUDA_BLOCK_BYTES if kind == "cuda" else 1, onednn_workspaces=kind == "cpu")
        with tracker:
            twin = _fake_twin(network, device).eval()
            tracker.module_names = {id(m): name or "network" for name, m in twin.named_modules()}
            weights = _tensor_bytes([*twin.parameters(), *twin.buffers()])
            params = sum(p.numel() for p in twin.parameters())
            tracker.start_step()
            sample = torch.zeros(batch_size, *image_shape, device=device)
            with torch.no_grad():
                eps = twin(sample, torch.zeros(batch_size, dtype=torch.long, device=device))
            del twin, sample, eps
    gc.collect()
    return MemoryPlan(
        device=kind,
        batch_size=batch_size,
        micro_batch_size=None,
        image_shape=list(image_shape),
        amp=False,
        params=params,
        peak_bytes=tracker.peak,
        floor_bytes=weights,
        parameter_bytes=weights,
        gradient_bytes=0,
        optimizer_bytes=0,
        ema_bytes=0,
        phase_peaks={"forward": tracker.peak},
        peak_phase=tracker.peak_where[0],
        peak_module=tracker.peak_where[1],
        usable_bytes=None,
        fits=None,
        seconds=time.perf_counter() - start,
        alive_at_peak=tracker.alive_at_peak(),
        notes=notes,
    )


def _candidate_micro_batch_sizes(batch_size: int) -> list[int]:
    """Micro-batch sizes worth trying, largest first: the smallest size for each number of micro-batches."""
    return sorted({math.ceil(batch_size / k) for k in range(1, batch_size + 1)}, reverse=True)


def check_micro_batch_size(micro_batch_size: int | str | None) -> None:
    """Raises :class:`BadInputError` unless ``micro_batch_size`` is a positive integer, None (the whole batch at once)
    or ``"auto"`` (the largest that :class:`TrainingMemoryPlan` predicts to fit)."""
    if micro_batch_size in (None, "auto") or (
        isinstance(micro_batch_size, int) and not isinstance(micro_batch_size, bool) and micro_batch_size >= 1
    ):
        return
    raise BadInputError(
        f"micro_batch_size must be a positive integer, null (the whole batch at once) or "
        f"'auto' (the largest predicted to fit); got {micro_batch_size!r}."
    )


class TrainingMemoryPlan:
    """The plan of ``configs/train.json``'s training step, made when the run starts (before its data is read) and
    logged; with ``micro_batch_size="auto"`` it picks the largest micro-batch predicted to fit, and it refuses a
    run predicted not to fit even in micro-batches of 1, saying what would.

    With ``memory_budget="auto"`` it then gives the network's memory-efficient forward what the device has to spare
    as its ``memory_budget``: the usable memory less the peak planned at budget 0, less :data:`AUTO_MARGIN` of that
    (the plan's unseen workspaces and fragmentation), halved until the plan at that budget fits; 0 where the
    device's memory is unknown, and on the CPU unless ``device_memory_gb`` is given (its memory also holds the
    cached dataset and other processes). A number, or a network built with a budget of its own
    (``--network_def#memory_budget``), is planned as it is.

    Args:
        device_memory_gb: GiB the run may use (None: the device's, see :func:`device_memory_bytes`).
        check: refuse a run predicted not to fit (False: only log the plan).
        memory_budget: ``"auto"``, or the bytes the network was built with (None: the network's, unchanged).
        patch_sampler: patch training's :class:`~bundle.diffusion.PatchSampler`: the step of each of its patch
            sizes (its batch of patches, the coordinates beside them) is planned, and the largest is the plan.
        Other arguments: as :func:`plan_training_step`; ``micro_batch_size`` may also be ``"auto"`` (the whole
            batch only, with ``optimizer_in_backward``).

    Attributes:
        micro_batch_size: the micro-batch size to train with (``micro_batch_size``, or the one ``"auto"`` chose).
        memory_budget: the network's budget in bytes after the plan (the one ``"auto"`` chose).
        plan: the :class:`MemoryPlan` of that size and budget.

    Raises:
        BadInputError: for a run predicted not to fit (with ``check``), or a ``micro_batch_size`` that is neither
            None, a positive integer nor ``"auto"``.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        noise_sampler,
        *,
        batch_size: int,
        image_shape: Sequence[int],
        micro_batch_size: int | str | None = None,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
        amp: bool = False,
        lambda_rec: float = 0.0,
        lambda_l2: float = 1e-4,
        device: torch.device | str = "cpu",
        device_memory_gb: float | None = None,
        check: bool = True,
        condition_channels: int = 0,
        memory_budget: float | str | None = None,
        optimizer_in_backward: bool = False,
        patch_sampler=None,
    ) -> None:
        usable = device_memory_bytes(device, device_memory_gb)
        if patch_sampler is None:
            batches = [(batch_size, list(image_shape[1:]))]
        else:  # each patch size's batch, its coordinates read beside the condition
            batches = patch_sampler.batches(batch_size)
            condition_channels += len(image_shape) - 1

        def plan(micro: int, with_amp: bool = amp) -> MemoryPlan:
            plans = [
                plan_training_step(
                    network,
                    optimizer,
                    scheduler,
                    noise_sampler,
                    batch_size=count,
                    image_shape=[image_shape[0], *size],
                    micro_batch_size=None if micro >= count else micro,
                    ema=ema,
                    amp=with_amp,
                    lambda_rec=lambda_rec,
                    lambda_l2=lambda_l2,
                    device=device,
                    usable_bytes=usable,
                    condition_channels=condition_channels,
                    optimizer_in_backward=optimizer_in_backward,
                )
                for count, size in batches
            ]
            return max(plans, key=lambda p: p.peak_bytes)

        trunk = unwrap(network)
        # "auto" spends what is spare unless the network was built with a budget of its own (--network_def#…)
        auto = memory_budget == "auto" and getattr(trunk, "memory_budget", None) == 0
        if micro_batch_size == "auto" and optimizer_in_backward:
            candidates = [batch_size]
        elif micro_batch_size == "auto":
            candidates = _candidate_micro_batch_sizes(batch_size)
        else:
            check_micro_batch_size(micro_batch_size)
            candidates = [micro_batch_size or batch_size]
        for micro in candidates:
            self.plan = plan(micro)
            if self.plan.fits is not False:
                break
        self.micro_batch_size = self.plan.micro_batch_size
        if auto and (torch.device(device).type == "cuda" or device_memory_gb is not None):
            self._spend_spare_memory(trunk, plan)
        elif auto:
            self.plan.notes.append(
                "memory_budget auto keeps no activations on the CPU unless device_memory_gb says "
                "how much it may use: its memory also holds the cached dataset and other "
                "processes, which the plan does not see"
            )
        self.memory_budget = float(getattr(trunk, "memory_budget", 0.0))
        chosen = [
            name
            for name, value in (("micro_batch_size", micro_batch_size), ("memory_budget", "auto" if auto else None))
            if value == "auto"
        ]
        chosen = f" ({' and '.join(chosen)} chosen by 'auto')" if chosen else ""
        logger.info("Memory plan of one training step%s:\n%s", chosen, self.plan.table())
        if check and self.plan.fits is False:
            raise BadInputError(self._refusal(plan, micro_batch_size == "auto" or candidates == [1]))

    def _spend_spare_memory(self, trunk: nn.Module, plan: Callable[..., MemoryPlan]) -> None:
        """Sets ``trunk.memory_budget`` to what the device has to spare beyond the plan at budget 0 (see the class
        docstring) and :attr:`plan` to the plan at that budget."""
        base = self.plan
        if base.usable_bytes is None or not base.fits or not hasattr(trunk, "memory_budget"):
            return
        budget = (base.usable_bytes - base.peak_bytes) * (1 - AUTO_MARGIN)
        for _ in range(4):
            trunk.memory_budget = budget
            self.plan = plan(self.micro_batch_size or base.batch_size)
            if self.plan.fits:
                return
            budget /= 2
        trunk.memory_budget, self.plan = 0, base

    def _refusal(self, plan: Callable[..., MemoryPlan], smallest: bool) -> str:
        p = self.plan
        message = (
            f"This run is predicted not to fit: one training step peaks at {p.peak_bytes / 1e9:.2f} GB "
            f"({p.floor_bytes / 1e9:.2f} GB of it weights, gradients, optimizer state and EMA) on {p.device} "
            f"with {p.usable_bytes / 1e9:.2f} GB usable, "
            + (
                "even in micro-batches of 1 sample. "
                if smallest
                else f"with micro-batches of {p.micro_batch_size or p.batch_size}; --micro_batch_size auto picks the "
                "largest that fits, if one does. "
            )
        )
        hints = []
        if smallest and p.usable_bytes > p.floor_bytes:
            working = p.peak_bytes - p.floor_bytes
            scale = ((p.usable_bytes - p.floor_bytes) / working) ** (1 / (len(p.image_shape) - 1))
            size = [max(1, int(s * scale)) for s in p.image_shape[1:]]
            hints.append(
                f"a spatial_size of about {size} (activations scale with voxels; on the native grid with "
                "a coarser --spacing, so that the box still holds the head; plan it with "
                "scripts/plan_memory.py)"
            )
        if not p.amp:
            with_amp = plan(p.micro_batch_size or p.batch_size, with_amp=True)
            hints.append(f"--amp true ({with_amp.peak_bytes / 1e9:.2f} GB" + (", fits)" if with_amp.fits else ")"))
        if p.ema_bytes:
            hints.append(f"--ema_decay 0 (EMA off saves {p.ema_bytes / 1e9:.2f} GB)")
        if p.floor_bytes >= p.usable_bytes:
            hints.append("a narrower network: its weights, gradients and optimizer state alone do not fit")
        return message + ("What would lower it: " + "; ".join(hints) + "." if hints else "")


def plan_config(
    config_file: str | Path | Sequence[str | Path], overrides: dict | None = None, check: bool = False
) -> TrainingMemoryPlan:
    """The :class:`TrainingMemoryPlan` of ``configs/train.json`` (or ``config_file``'s) ``memory_plan`` with
    ``overrides`` (``{"spatial_size": [128, 128, 128], "network_def#channels": [...]}``), its network, optimizer and
    EMA built as FakeTensors: no memory, no device, no data read, and ``check=False`` reports a plan that does not
    fit instead of refusing it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides or {})
    parser["network"] = "@network_def"  # not moved to the device: FakeTensors of the plan's device are made from it
    parser["memory_plan"]["check"] = check
    try:
        for name in (
            "noise_scheduler",
            "settings",
            "noise_sampler",
        ):  # real: their set-up reads values (the schedule's)
            parser.get_parsed_content(name)
        with FakeTensorMode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", _FAKE_DATA_POINTER)
            for name in ("network", "optimizer", "ema"):
                parser.get_parsed_content(name)
        return parser.get_parsed_content("memory_plan")
    except RuntimeError as error:  # the config parser's wrapping of a component's error
        found = bad_input_in(error)
        if found is None:
            raise
        raise found from None
