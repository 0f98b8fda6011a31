"""Point-to-point messages, issued the way NCCL needs them. Every send and receive in MegaSora
(the pipeline's stage links, ring attention's K/V and dK/dV hops) goes through `exchange`.

NCCL's rules, which gloo does not enforce (gloo buffers sends and matches by tag):

1. Between two ranks of one process group, sends and receives run on one stream in the
   order they were issued, both directions together.
2. The k-th send from A to B is the k-th receive on B from A; tags are ignored.
3. A large send completes only once its receive is running (rendezvous), so a receive
   issued before a send on both ends of a pair waits forever, and so do two sends.
4. A `batch_isend_irecv` is one NCCL group: its sends and receives start together, and
   its handle is done when all of them are.

So: ops that cross between two ranks go in ONE `exchange` on at least one end (ring
attention: every hop's send and receive together, Megatron-Core's `_batched_p2p_ops`),
or are issued in an order the other end mirrors (the pipeline: parity_posts_early).
tests/nccl_replay.py replays the traffic of real runs under these rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

Message = tuple[torch.Tensor, int]  # (tensor, global peer rank)


@dataclass
class Exchange:
    """The handles of one `exchange`; wait() before reading a received buffer or reusing a sent one."""
    works: list = field(default_factory=list)
    sent: list[torch.Tensor] = field(default_factory=list)  # keeps the send buffers alive until done

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works.clear()
        self.sent.clear()


def exchange(sends: Sequence[Message], recvs: Sequence[Message], group: Optional[ProcessGroup],
             tag: int = 0) -> Exchange:
    """Start `sends` (tensor, dst) and receives into `recvs` (buffer, src) as one NCCL group.

    Messages between the same two ranks pair up in list order on both ends (rule 2); the
    i-th message of a call carries tag + i, so gloo pairs them the same way."""
    sent = [t.detach().contiguous() for t, _ in sends]
    ops = [dist.P2POp(dist.isend, t, peer, group, tag + i) for i, (t, (_, peer)) in enumerate(zip(sent, sends))]
    ops += [dist.P2POp(dist.irecv, buf, peer, group, tag + i) for i, (buf, peer) in enumerate(recvs)]
    if not ops:
        return Exchange()
    return Exchange(list(dist.batch_isend_irecv(ops)), sent)


def parity_posts_early(stage: int) -> bool:
    """Which end of a pipeline link may post a receive before it computes (and sends).

    On each link between stages s and s+1 the crossing messages (activation forward,
    gradient back) must not both be received before they are sent (rule 3): if both ends
    post early, each stream starts with a receive whose send is queued behind the other
    end's receive. Even stages post early; odd stages batch each receive with the send
    that precedes it, so every link has exactly one early end. (Megatron-Core's `_p2p_ops`
    breaks the same symmetry by stage parity.)"""
    return stage % 2 == 0
