"""The parallel layout (dp, pp, tp, ulysses, ring) and its process groups.

Rank order, innermost first: tp, ulysses, ring, dp, pp. So

    rank = (((pp * DP + dp) * RING + ring) * ULYSSES + ulysses) * TP + tp

tp and ulysses (the chattiest axes: per-layer all-gathers / all-to-alls) stay inside a
node as long as tp*ulysses <= GPUs per node; ring moves K/V point-to-point and tolerates
the next hop; dp and pp talk least and span nodes.

The sequence of one sample is split over ring (outer) x ulysses x tp (inner): global
sequence chunk c = (ring * ULYSSES + ulysses) * TP + tp holds tokens [c*N/S, (c+1)*N/S),
S = tp*ulysses*ring, which is exactly the order of the ranks of the `tpsp` group.

`validate_config_layout` checks a config's layout at a world size (config.check_layout, the
one definition of a valid layout) before any process group exists and returns its
`ParallelLayout`; `build_mesh` then creates
every group on every rank in one agreed order and returns a `Mesh`, which is passed
explicitly to whatever needs a group. `MeshMPU` adapts it to DeepSpeed's `mpu` interface.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist
from torch.distributed import ProcessGroup

from megasora.config import Config, LayoutError, ModelShape, ParallelConfig, check_layout, model_parallel_size

AXES = ("tp", "ulysses", "ring", "dp", "pp")  # innermost first


def axis_name(axes: tuple[str, ...] | list[str], layout: ParallelLayout) -> str | None:
    """The name communication on a group spanning `axes` is counted under (the counter in
    parallel/comm_counter.py and the planner's plan/communication.py), or None if it has one rank."""
    live = [a for a in AXES if a in axes and getattr(layout, a) > 1]
    return "+".join(live) if live else None


@dataclass(frozen=True)
class ParallelLayout:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ulysses x ring)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp * self.ulysses * self.ring

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    @classmethod
    def checked(cls, parallel: ParallelConfig, model: ModelShape, world_size: int, *, zero_stage: int,
                grad_accum: int, offload_optimizer: str) -> "ParallelLayout":
        """The layout of `parallel` on `world_size` ranks (dp = world / tp*ulysses*ring*pp), once
        config.check_layout accepts it; raises LayoutError naming the key to change otherwise."""
        check_layout(parallel, model, zero_stage=zero_stage, grad_accum=grad_accum,
                     offload_optimizer=offload_optimizer, world_size=world_size)
        return cls(dp=world_size // model_parallel_size(parallel), pp=parallel.pp, tp=parallel.tp,
                   ulysses=parallel.ulysses, ring=parallel.ring)

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> coordinate on every axis (tp innermost)."""
        out = {}
        for axis in AXES:
            out[axis] = rank % self.size(axis)
            rank //= self.size(axis)
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for axis in reversed(AXES):
            rank = rank * self.size(axis) + coords[axis]
        return rank

    def groups_over(self, axes: tuple[str, ...]) -> list[list[int]]:
        """All rank groups that vary `axes` with the other axes fixed, in a fixed order.

        Ranks inside a group are ascending, i.e. ordered by the axes innermost first.
        """
        fixed = [a for a in AXES if a not in axes]
        varied = [a for a in AXES if a in axes]
        groups = []
        for fixed_vals in itertools.product(*(range(self.size(a)) for a in reversed(fixed))):
            base = dict(zip(reversed(fixed), fixed_vals))
            ranks = []
            for varied_vals in itertools.product(*(range(self.size(a)) for a in varied)):
                ranks.append(self.rank_of({**base, **dict(zip(varied, varied_vals))}))
            groups.append(sorted(ranks))
        return groups


# Named groups: name -> axes it spans. Built in this order on every rank.
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "sp": ("ulysses", "ring"),             # sequence parallel (one sample's attention)
    "tpsp": ("tp", "ulysses", "ring"),     # everything that shards one sample's tokens
    "dp": ("dp",),
    "dpsp": ("ulysses", "ring", "dp"),     # gradient averaging / ZeRO partitioning
    "mp": ("tp", "pp"),                    # model parallel: ranks holding different parameters
    "pp": ("pp",),
}


@dataclass
class Mesh:
    """This rank's view of the layout: coordinates, groups and their member ranks."""
    layout: ParallelLayout
    rank: int
    coords: dict[str, int]
    groups: dict[str, Optional[ProcessGroup]] = field(repr=False)
    ranks: dict[str, list[int]]

    def group(self, name: str) -> Optional[ProcessGroup]:
        return self.groups[name]

    def communicating_group(self, name: str) -> ProcessGroup:
        """The group of an axis this rank communicates over; a mesh built without groups (tests) has none."""
        group = self.groups[name]
        if group is None:
            raise RuntimeError(f"this mesh has no process group for axis {name!r}; build it with build_mesh()")
        return group

    def size(self, name: str) -> int:
        return len(self.ranks[name])

    def rank_in(self, name: str) -> int:
        return self.ranks[name].index(self.rank)


def validate_config_layout(cfg: Config, world_size: int) -> ParallelLayout:
    """The layout `cfg` runs as at `world_size`, every layout check passed, with no process group:
    used by the trainer before start-up and by `megasora submit` before anything is queued."""
    t = cfg.train
    return ParallelLayout.checked(cfg.parallel, cfg.model, world_size, zero_stage=t.zero_stage,
                                  grad_accum=t.grad_accum, offload_optimizer=t.offload_optimizer)


def build_mesh(layout: ParallelLayout, rank: Optional[int] = None) -> Mesh:
    """Create all groups of `layout` (torch.distributed must be initialised, world matching).

    new_group is collective over the whole world, so every rank creates every group, in
    the order of GROUP_AXES and then of `groups_over`, keeping the handles it belongs to.
    """
    world = dist.get_world_size()
    if layout.world_size != world:
        raise LayoutError(f"layout {layout} needs {layout.world_size} processes, the world has {world}")
    rank = dist.get_rank() if rank is None else rank
    groups: dict[str, Optional[ProcessGroup]] = {}
    members: dict[str, list[int]] = {}
    for name, axes in GROUP_AXES.items():
        for ranks in layout.groups_over(axes):
            handle = dist.new_group(ranks=ranks)
            if rank in ranks:
                groups[name], members[name] = handle, ranks
    return Mesh(layout=layout, rank=rank, coords=layout.coords(rank), groups=groups, ranks=members)


class MeshMPU:
    """DeepSpeed's `mpu` interface over a Mesh (pass as deepspeed.initialize(mpu=...)).

    What DeepSpeed 0.19 does with it (runtime/engine.py, zero/stage_1_and_2.py, stage3.py):
    gradients are all-reduced over get_sequence_data_parallel_group() (dp x sp) and divided
    by its size / get_sequence_parallel_world_size() = dp, i.e. SUMMED over sp and AVERAGED
    over dp; ZeRO partitions optimizer state over dp x sp (and ZeRO-3 parameters, converted by
    train/engine.py zero3_partitioner over get_sequence_data_parallel_group: DeepSpeed's own
    conversion would use get_data_parallel_group); grad-norm clipping reduces over
    get_model_parallel_group() and counts parameters without `tensor_model_parallel` only on
    tensor-parallel rank 0; checkpoints are named by get_model_parallel_rank(). The sum over
    sp is what our sequence-parallel gradients need (see docs/parallelism.md).
    `initialize_sequence_parallel` is deliberately absent: its presence makes DeepSpeed
    ignore this object's data-parallel groups.
    """

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    # tensor / model parallel
    def get_tensor_model_parallel_group(self): return self.mesh.group("tp")
    def get_tensor_model_parallel_world_size(self) -> int: return self.mesh.size("tp")
    def get_tensor_model_parallel_rank(self) -> int: return self.mesh.rank_in("tp")
    def get_tensor_model_parallel_src_rank(self) -> int: return self.mesh.ranks["tp"][0]
    def get_model_parallel_group(self): return self.mesh.group("mp")
    def get_model_parallel_world_size(self) -> int: return self.mesh.size("mp")
    def get_model_parallel_rank(self) -> int: return self.mesh.rank_in("mp")
    def get_slice_parallel_group(self): return self.mesh.group("tp")
    def get_slice_parallel_world_size(self) -> int: return self.mesh.size("tp")
    def get_slice_parallel_rank(self) -> int: return self.mesh.rank_in("tp")

    # data parallel (replicas that see different samples)
    def get_data_parallel_group(self): return self.mesh.group("dp")
    def get_data_parallel_world_size(self) -> int: return self.mesh.size("dp")
    def get_data_parallel_rank(self) -> int: return self.mesh.rank_in("dp")
    def get_data_parallel_group_ranks(self) -> list[int]: return list(self.mesh.ranks["dp"])

    # sequence parallel and its product with dp
    def get_sequence_parallel_group(self): return self.mesh.group("sp")
    def get_sequence_parallel_world_size(self) -> int: return self.mesh.size("sp")
    def get_sequence_parallel_rank(self) -> int: return self.mesh.rank_in("sp")
    def get_sequence_data_parallel_group(self): return self.mesh.group("dpsp")
    def get_sequence_data_parallel_world_size(self) -> int: return self.mesh.size("dpsp")
    def get_sequence_data_parallel_rank(self) -> int: return self.mesh.rank_in("dpsp")

    # pipeline
    def get_pipe_parallel_group(self): return self.mesh.group("pp")
    def get_pipe_parallel_world_size(self) -> int: return self.mesh.size("pp")
    def get_pipe_parallel_rank(self) -> int: return self.mesh.rank_in("pp")
    def get_pipeline_model_parallel_group(self): return self.mesh.group("pp")
    def get_pipeline_model_parallel_world_size(self) -> int: return self.mesh.size("pp")
    def get_pipeline_model_parallel_rank(self) -> int: return self.mesh.rank_in("pp")
