"""Tensor parallelism: which KV heads this process holds, read off the model's own sharding.

Under transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun) every attention's
`k_proj` weight is a DTensor sharded by rows over the mesh's `tp` dimension, so rank r computes (and caches) a
contiguous block of the KV heads. A LUKVCache on that rank holds exactly those heads, with that block of the
profile's budgets (computed over every head, then sliced: the same budgets as in one process).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from lukv_compile.log import report_once
from lukv_compile.profile import Profile
from lukv_compile.profiles import shards_of


@dataclass(frozen=True)
class HeadShard:
    """KV heads [start, stop) of `total`, held by rank `rank` of `ranks`."""

    start: int
    stop: int
    total: int
    rank: int
    ranks: int

    @property
    def heads(self) -> slice:
        return slice(self.start, self.stop)


def kv_head_shard(model: torch.nn.Module, kv_heads: int, head_dim: int) -> HeadShard | None:
    """This process's KV heads when `model` is tensor-parallel (see module docstring), else None.

    Raises ValueError for a layout lukv cannot serve: KV heads replicated on every rank or split across ranks (more
    ranks than KV heads), or sharded other than by whole heads in rows.
    """
    weight = next((m.k_proj.weight for m in model.modules() if isinstance(getattr(m, "k_proj", None),
                                                                           torch.nn.Linear)), None)
    dtensor = sys.modules.get("torch.distributed.tensor")  # never imported here: no model of it can be sharded
    if weight is None or dtensor is None or not isinstance(weight, dtensor.DTensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, weight.placements
    if all(isinstance(p, Replicate) for p in placements):
        raise ValueError(f"lukv: this tensor-parallel model replicates its {kv_heads} KV heads on every rank (more "
                         f"ranks, {mesh.size()}, than KV heads): every rank would hold and evict the same heads. Use "
                         f"at most {kv_heads} ranks")
    rows = weight.to_local().shape[0]
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    if len(sharded) == 1 and rows % head_dim:
        raise ValueError(f"lukv: this tensor-parallel model splits its {kv_heads} KV head(s) across "
                         f"{mesh.size(sharded[0])} ranks ({rows} of each head's {head_dim} dims per rank: more ranks "
                         f"than KV heads); lukv keeps each KV head whole on one rank: use at most {kv_heads} ranks")
    if len(sharded) != 1 or weight.shape[0] != kv_heads * head_dim:
        raise ValueError(f"lukv: this tensor-parallel model shards k_proj as {placements} over {mesh}; lukv serves "
                         "KV heads split by rows over one mesh dimension (transformers' tp_plan='auto')")
    local = rows // head_dim
    rank = mesh.get_coordinate()[sharded[0]]
    return HeadShard(rank * local, rank * local + local, kv_heads, rank, mesh.size(sharded[0]))


def report_balance(profile: Profile, compression: float, shard: HeadShard) -> None:
    """Say once per process each rank's share of the kept tokens the profile implies, and when the shares are
    uneven and the profile was not solved for this many shards, the command that makes a balanced one."""
    keep = 1.0 - profile.fractions(compression)  # [L, H]
    keep = np.delete(keep, list(profile.excluded_layers), axis=0).sum(axis=0)
    width = shard.stop - shard.start
    shares = keep.reshape(shard.ranks, width).sum(axis=1) / keep.sum()
    spread = ", ".join(f"rank {r}: {share:.1%}" for r, share in enumerate(shares))
    report_once(f"lukv: tensor parallel over {shard.ranks} ranks, KV heads {shard.start}..{shard.stop - 1} here; "
                f"share of the kept KV tokens at compression {compression:g}: {spread}")
    solved_for = shards_of(profile)
    if shares.max() > 1.05 * shares.min() and solved_for != shard.ranks:
        report_once(f"lukv: the profile's budgets put {shares.max() / shares.min():.2f}x more KV on the fullest rank "
                    f"than on the emptiest (it was solved for {solved_for} shard(s)): the fullest rank runs out of "
                    f"memory first and is every decode step's straggler. `lukv profile MODEL --shards "
                    f"{shard.ranks} ...` solves budgets balanced within 5% across {shard.ranks} ranks")
