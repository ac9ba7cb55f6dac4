"""Data-parallel training with PyTorch's own engine (``torchrun``), and the random streams that make
it reproducible.

``torchrun --nproc_per_node W -m pyrodiff train ...`` starts W processes; each joins the process
group (NCCL on GPUs, gloo on CPUs), trains the network wrapped in ``DistributedDataParallel`` on its
slice of every global batch, and draws its noise from its own random stream.  Streams are numbered
globally: rank r with M micro-batches per step owns streams ``r * M .. r * M + M - 1``, stream s being
seeded with ``seed + s``.  One process with ``micro_batches = W * M`` therefore draws exactly the same
noise for the same examples as W processes with M each: the two runs give the same parameters (up to
the order of floating-point sums).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over ranks (itself when alone)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def all_cat(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` of every rank, concatenated in rank order along dim 0 (equal shapes)."""
        if not self.distributed:
            return value
        parts = [torch.empty_like(value) for _ in range(self.size)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Wait for every rank, then leave the process group."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_world(device: str | torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment, or run alone."""
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(device)
    return World(rank, dist.get_world_size(), device)


class RandomStreams:
    """The torch random streams of this rank's micro-batches (Pyro draws from torch's global generators, so
    each micro-batch runs with its stream swapped in): the CPU generator's state in :attr:`states` and, on a
    CUDA device, whose generator draws the noise there, that generator's state in :attr:`device_states`.
    Swapping a CUDA generator's state (a seed and an offset kept on the host) does not wait for the device."""

    def __init__(self, seed: int, world: World, micro_batches: int) -> None:
        self.ids = [world.rank * micro_batches + j for j in range(micro_batches)]
        self.device = world.device if world.device.type == "cuda" else None
        self.states, self.device_states = [], []
        for s in self.ids:
            torch.manual_seed(seed + s)  # seeds every device's generator too
            self.states.append(torch.get_rng_state())
            if self.on_device:
                self.device_states.append(torch.cuda.get_rng_state(self.device))

    @property
    def on_device(self) -> bool:
        """Whether the streams include a CUDA generator's."""
        return self.device is not None

    @contextmanager
    def stream(self, j: int):
        """Run a block with micro-batch j's stream as torch's global generators."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states[j])
        if self.on_device:
            outer_device = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.device_states[j], self.device)
        try:
            yield
        finally:
            self.states[j] = torch.get_rng_state()
            torch.set_rng_state(outer)
            if self.on_device:
                self.device_states[j] = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_device, self.device)
