"""torch.distributed plumbing: process group from torchrun's environment, DDP / FSDP2 wrapping, and the
deterministic split of packs into optimizer steps and ranks. All communication is torch.distributed's own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1.

    NCCL with one GPU per local rank when CUDA is available, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def wrap_model(model: torch.nn.Module, info: DistInfo, dist_config: dict) -> torch.nn.Module:
    """DDP for small models, FSDP2 (`fully_shard` per layer, then the root) with mixed precision for large ones.

    A single process gets the model back unwrapped.
    """
    if not info.enabled:
        return model
    if dist_config["strategy"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                       find_unused_parameters=bool(dist_config.get("find_unused_parameters", True)))
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dist_config["fsdp_param_dtype"]),
                                  reduce_dtype=getattr(torch, dist_config["fsdp_reduce_dtype"]))
    # Vision layers past `feature_layer` never run; as their own FSDP groups they would never be unsharded and
    # FSDP2's gradient accumulation trips over them, so they stay in the root group with the other small tensors.
    used_vision_layers = list(model.vision_tower.encoder.layers[: model.config.vision.layers_used])
    for layer in used_vision_layers + list(model.language_model.layers):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class StepSampler:
    """Which packs each rank trains on at each optimizer step: deterministic, so resuming needs only the step.

    Each epoch is a seeded permutation of the packs cut into global batches of `global_batch_size` (an incomplete
    last batch is left out of that epoch); rank r takes every world_size-th pack of the batch.
    """

    def __init__(self, num_packs: int, global_batch_size: int, rank: int, world_size: int, seed: int):
        if global_batch_size % world_size:
            raise ValueError(f"batch.global_batch_size {global_batch_size} must be a multiple of the "
                             f"{world_size} ranks")
        if num_packs < global_batch_size:
            raise ValueError(f"the data gives {num_packs} packed sequences, fewer than one global batch "
                             f"({global_batch_size}); lower batch.global_batch_size or add data")
        self.num_packs, self.global_batch_size = num_packs, global_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = num_packs // global_batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_packs, generator=g).tolist()

    def global_batch(self, step: int) -> list[int]:
        """All packs of optimizer step `step` (0-based), in the order ranks interleave them."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        return order[index * self.global_batch_size:(index + 1) * self.global_batch_size]

    def rank_batch(self, step: int) -> list[int]:
        return self.global_batch(step)[self.rank::self.world_size]
