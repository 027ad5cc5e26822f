"""DistributedDataParallel over two CPU processes (gloo) equals one process on the joint batch, with each
rank back-propagating its half at once or one sample at a time (gradient accumulation under ``no_sync``), with
the engine keeping some of its steps (``memory_budget``), and for a network that reads coordinates, on patches."""

from __future__ import annotations

import faulthandler
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import redraw_zero_init_, relative_error
from torch.nn.parallel import DistributedDataParallel

from bundle.diffusion import idm_loss_backward
from bundle.networks import InvertibleDiffusionUNet, voxel_coordinates


def _model(coordinates: bool) -> InvertibleDiffusionUNet:
    torch.manual_seed(0)
    model = InvertibleDiffusionUNet(
        3, 2, 2, channels=(8, 16), num_blocks=1, attention_levels=(True, True), coordinates=coordinates
    )
    return redraw_zero_init_(model)


def _batch(coordinates: bool):
    """x_t, t and the target; with ``coordinates``, x_t of 8³ patches with their places in a 16³ volume after it."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 8, 8, 8, generator=generator)
    t = torch.randint(0, 100, (4,), generator=generator)
    target = torch.randn(4, 2, 8, 8, 8, generator=generator)
    if coordinates:
        whole = voxel_coordinates([16, 16, 16])
        places = torch.stack([whole[:, 8 * (i % 2) :, 4:12, 8 * (i // 2) :][:, :8, :, :8] for i in range(4)])
        x = torch.cat([x, places], dim=1)
    return x, t, target


WATCHDOG_SECONDS = 240  # a worker still running then writes every thread's stack and exits (the test waits 300 s)


def _worker(
    rank: int, world_size: int, out_dir: str, micro_batch_size: int | None, memory_budget: float, coordinates: bool
) -> None:
    stacks = open(os.path.join(out_dir, f"stacks{rank}.txt"), "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True, file=stacks)
    # a file store: no rank hosts a TCP store that the other could still be talking to when it exits
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    model = _model(coordinates)
    model.memory_budget = memory_budget
    model = DistributedDataParallel(model)
    x, t, target = (v.chunk(world_size)[rank] for v in _batch(coordinates))
    idm_loss_backward(model, x, t, target, lambda_rec=0.0, lambda_l2=0.0, micro_batch_size=micro_batch_size)
    torch.save([p.grad for p in model.module.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
    dist.barrier()  # as multi_gpu_train.json's finalize: no rank tears down while the other still reads its last bytes
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize(
    "micro_batch_size, memory_budget, coordinates", [(None, 0, False), (1, 0, False), (1, 2e5, False), (1, 0, True)]
)
def test_ddp_two_processes_match_one_process_on_the_joint_batch(tmp_path, micro_batch_size, memory_budget, coordinates):
    context = mp.start_processes(
        _worker, args=(2, str(tmp_path), micro_batch_size, memory_budget, coordinates), nprocs=2, join=False
    )
    try:
        for _ in range(300):  # at most 5 minutes; each join() raises if a worker failed
            if context.join(timeout=1):
                break
        else:
            raise TimeoutError("the two DDP workers did not finish in 5 minutes")
    except Exception as error:  # where each worker was: the stacks its watchdog wrote
        stacks = "".join(f"\nrank {rank}:\n{(tmp_path / f'stacks{rank}.txt').read_text()}" for rank in range(2))
        raise AssertionError(f"{error}\nthe workers' stacks after {WATCHDOG_SECONDS} s:{stacks}") from error
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    model = _model(coordinates)
    x, t, target = _batch(coordinates)
    (model(x, t) - target).square().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, g_ddp, p in zip(names, grads, model.parameters(), strict=True):
            assert g_ddp is not None, name
            assert relative_error(g_ddp, p.grad) <= 1e-5, name
