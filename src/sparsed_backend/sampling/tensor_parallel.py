"""Sampling under tensor parallelism: every rank of a TP group must write the same tokens.

transformers shards a model with ``from_pretrained(..., distributed_config=
DistributedConfig(tp_plan="auto"))`` under torchrun; every rank then runs the whole sampler on
the same inputs and holds the same (gathered) logits. What can still differ between ranks is
the randomness: a sampler draws Gumbel noise, multinomial samples or random remasking scores
from a generator that each rank owns. Ranks seeded differently, or one whose global RNG was
consumed by something else, would pick different tokens and then feed the shared forward
different sequences (wrong results, no error). So the samplers let the first rank of the TP
group decide: after every step that changes the canvas, its tokens are broadcast to the other
ranks (one broadcast of the B x decoded tokens per step; the forward around it costs far more).

Attention itself needs no communication: each rank holds whole query heads and the kv heads of
exactly their GQA groups, and SparseD selects key blocks per head, so each rank scores, selects
and caches the block masks of its own heads only (see docs/tensor_parallel.md).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RankSync", "rank_sync", "tensor_parallel_group"]


def _dtensor_class():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def tensor_parallel_group(model: nn.Module):
    """The process group ``model`` is tensor-parallel over, or None for a model on one device.

    The group is read from the mesh of the model's first sharded (DTensor) parameter. Only
    plain tensor parallelism is supported by the samplers: a model that is also sharded for
    data or pipeline parallelism (its ranks hold different batches) raises NotImplementedError.
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return None
    mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, dtensor)), None)
    if mesh is None:
        return None
    dist_config = getattr(getattr(model, "config", None), "distributed_config", None)
    others = {
        name: getattr(dist_config, name, None)
        for name in ("fsdp_size", "dp_replicate_size", "pp_size", "ep_size")
        if (getattr(dist_config, name, None) or 1) > 1
    }
    names = mesh.mesh_dim_names or ()
    if others or (mesh.ndim > 1 and "tp" not in names):
        raise NotImplementedError(
            "the diffusion samplers support tensor parallelism only (every rank holds the same batch); "
            f"got a model sharded over a mesh of shape {tuple(mesh.shape)} with dims {names or None}"
            + (f" and {others}" if others else "")
        )
    return mesh.get_group("tp") if mesh.ndim > 1 else mesh.get_group()


class RankSync:
    """Makes the ranks of one TP group agree: the group's first rank decides.

    Args:
        group: the TP process group (from :func:`tensor_parallel_group`).
    """

    def __init__(self, group) -> None:
        self.group = group
        self.src = torch.distributed.get_global_rank(group, 0)

    def _from_first(self, t: torch.Tensor) -> torch.Tensor:
        shared = t.contiguous().clone()
        torch.distributed.broadcast(shared, src=self.src, group=self.group)
        return shared

    def check_same(self, name: str, t: torch.Tensor | None) -> None:
        """Raise ValueError on every rank when ``t`` differs between the ranks (reads back once)."""
        if t is None:
            return
        # Shapes first: a broadcast between tensors of different sizes would fail or hang.
        shape = torch.tensor(t.shape, dtype=torch.int64, device=t.device)
        differs = (self._from_first(shape) != shape).any()
        if not self._any(differs):
            differs = (self._from_first(t) != t).any()
        if self._any(differs):
            raise ValueError(
                f"{name} differs between the tensor-parallel ranks; every rank of the group must pass "
                "the same prompt batch"
            )

    def _any(self, flag: torch.Tensor) -> bool:
        flag = flag.to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """The first rank's ``t`` on every rank (no host sync)."""
        return self._from_first(t)


def rank_sync(model: nn.Module) -> RankSync | None:
    """A :class:`RankSync` for a tensor-parallel ``model``, or None on one device."""
    group = tensor_parallel_group(model)
    return None if group is None else RankSync(group)
