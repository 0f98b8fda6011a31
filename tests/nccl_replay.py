"""Record the communication a real (gloo) run issues and replay it under NCCL's ordering rules.

Gloo buffers sends and matches messages by tag, so an order that hangs a GPU job runs fine
in the CPU tests. This module is the test-side guard:

- `recording()` wraps torch.distributed's point-to-point calls (isend, irecv, send, recv,
  batch_isend_irecv), the collectives, and the `.wait()` of every handle they return, and
  records in issue order: kind, peer, process group, bytes, batch id, blocking or not.
- `replay(traces)` runs the recorded per-rank sequences under NCCL's semantics, treating
  every send as large (rendezvous):
    * ops between two ranks on one process group run on one stream, in issue order, both
      directions together: an op starts only when every earlier unit on that stream is done;
    * the k-th send from A to B on a group matches the k-th receive on B from A (NCCL
      ignores tags); a send and its receive complete together, once both have started;
    * a batch_isend_irecv is one unit: its ops are posted together and it is done when all
      are (NCCL coalesces it into one kernel, and hands back one handle for it);
    * collectives run on their group's own stream; the k-th collective of a group completes
      once every member has started its k-th (STREAM_MODELS: which p2p ops share that stream);
    * a blocking call (send, recv, a collective without async_op) and every .wait() stop
      the rank issuing anything later until the unit is done. On a GPU the host would go on,
      but the stream waits, and the NCCL stream of each later op waits on that stream.
  It reports whether everything completes and, if not, the stuck ops.

Used by tests/test_nccl_order.py on traces of `megasora.train.trainer.train` in spawned
gloo workers, and on hand-written traces.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

P2P_NAMES = ("isend", "irecv", "send", "recv")
COLLECTIVE_NAMES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
    "all_to_all", "all_to_all_single", "all_reduce_coalesced", "reduce", "gather", "scatter", "barrier",
    "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


@dataclass
class Record:
    """One traced call. kind: send | recv | coll | wait. A batch's ops share `batch`; `unit` names what
    a later wait refers to (the batch, or the single op)."""
    kind: str
    unit: int
    name: str = ""
    group: str = ""
    members: list[int] = field(default_factory=list)  # the group's global ranks
    peer: int = -1                                     # global rank (send / recv)
    nbytes: int = 0
    batch: Optional[int] = None
    blocking: bool = False
    where: str = ""


# ---------------------------------------------------------------- recording


class Recorder:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.units = 0
        self.depth = 0  # > 0 inside a traced call: torch's own nested calls are not separate ops

    def new_unit(self) -> int:
        self.units += 1
        return self.units - 1

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records))


_ACTIVE: list[Recorder] = []  # the recorder of the current `recording()` block, if any
_INSTALLED: dict[str, Callable] = {}


class TracedWork:
    """A handle whose wait() is recorded; everything else goes to the real handle."""

    def __init__(self, work: Any, unit: int, recorder: Recorder) -> None:
        self._work, self._unit, self._recorder = work, unit, recorder

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._recorder.records.append(Record("wait", self._unit, where=_caller()))
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _caller() -> str:
    """file:line:function of the innermost frame outside torch, deepspeed and the wrappers."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in ("/torch/", "/deepspeed/", "nccl_replay", "contextlib", "comm_counter")):
            return f"{Path(name).name}:{frame.f_lineno}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _group_id(group: Any) -> tuple[str, list[int]]:
    group = group if group is not None else c10d._get_default_group()
    return group.group_name, dist.get_process_group_ranks(group)


def _p2p_record(name: str, original: Callable, args: tuple, kwargs: dict, unit: int) -> Record:
    bound = inspect.signature(original).bind(*args, **kwargs)
    a = bound.arguments
    group = a.get("group")
    peer = a.get("dst", a.get("src"))
    if peer is None:
        peer = dist.get_global_rank(group or c10d._get_default_group(), a.get("group_dst", a.get("group_src")))
    gname, members = _group_id(group)
    tensor = a["tensor"]
    return Record("send" if name in ("isend", "send") else "recv", unit, name, gname, members, int(peer),
                  tensor.numel() * tensor.element_size(), None, name in ("send", "recv"), _caller())


def _coll_record(name: str, original: Callable, args: tuple, kwargs: dict, unit: int) -> Record:
    a = inspect.signature(original).bind(*args, **kwargs).arguments
    gname, members = _group_id(a.get("group"))
    return Record("coll", unit, name, gname, members, blocking=not a.get("async_op", False), where=_caller())


def _traced(name: str, original: Callable) -> Callable:
    describe = _p2p_record if name in P2P_NAMES else _coll_record

    @functools.wraps(original)
    def traced(*args: Any, **kwargs: Any) -> Any:
        rec = _ACTIVE[-1] if _ACTIVE else None
        if rec is None or rec.depth:
            return original(*args, **kwargs)
        record = describe(name, original, args, kwargs, rec.new_unit())
        rec.records.append(record)
        rec.depth += 1
        try:
            work = original(*args, **kwargs)
        finally:
            rec.depth -= 1
        return work if record.blocking or work is None else TracedWork(work, record.unit, rec)

    return traced


def _traced_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def batch_isend_irecv(p2p_op_list: list) -> list:
        rec = _ACTIVE[-1] if _ACTIVE else None
        if rec is None or rec.depth:
            return original(p2p_op_list)
        unit, where = rec.new_unit(), _caller()
        for op in p2p_op_list:
            gname, members = _group_id(op.group)
            kind = "send" if op.op is c10d.isend else "recv"
            rec.records.append(Record(kind, unit, "batch_" + kind, gname, members, int(op.peer),
                                      op.tensor.numel() * op.tensor.element_size(), unit, False, where))
        rec.depth += 1
        try:
            works = original(p2p_op_list)
        finally:
            rec.depth -= 1
        return [TracedWork(w, unit, rec) for w in works]

    return batch_isend_irecv


def install() -> None:
    """Wrap torch.distributed's communication calls, once per process, in both namespaces (code calls
    torch.distributed.X; P2POp and torch's own helpers use distributed_c10d.X). Install before the
    code under test wraps them itself (megasora's comm_counter, DeepSpeed's cached functions)."""
    if _INSTALLED:
        return
    for name in (*P2P_NAMES, *COLLECTIVE_NAMES, "batch_isend_irecv"):
        original = getattr(c10d, name, None)
        if original is None:
            continue
        _INSTALLED[name] = _traced_batch(original) if name == "batch_isend_irecv" else _traced(name, original)
        setattr(c10d, name, _INSTALLED[name])
        setattr(dist, name, _INSTALLED[name])


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record this process's communication while the block runs."""
    install()
    rec = Recorder()
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)


# ---------------------------------------------------------------- replay

# Which ops of a rank share one in-order stream, besides each group's collectives:
#   pair:  point-to-point ops per (group, peer), batched or not;
#   torch: what ProcessGroupNCCL does: a batch_isend_irecv runs on its group's communicator
#          (it may reach several peers), next to the collectives; single isend/irecv per peer;
#   group: everything of a group on one stream (ProcessGroupNCCL with eager init, device_id=).
STREAM_MODELS = ("pair", "torch", "group")


@dataclass
class Op:
    rank: int
    record: Record
    unit: tuple[int, int]          # (rank, unit id)
    match_key: tuple               # what pairs it with its partner(s)
    stream: tuple                  # (rank, group, peer) or (rank, group, "coll")
    done: bool = False

    def describe(self) -> str:
        r = self.record
        what = f"{r.name} peer {r.peer}" if r.kind != "coll" else f"{r.name} over {r.members}"
        return f"rank {self.rank}: {what} on group {r.group} ({r.nbytes} B) at {r.where}"


@dataclass
class ReplayResult:
    ok: bool
    p2p_done: int
    p2p_total: int
    coll_done: int
    coll_total: int
    stuck: list[str]

    def summary(self) -> str:
        head = (f"{'completes' if self.ok else 'DEADLOCK'}: {self.p2p_done} of {self.p2p_total} point-to-point ops, "
                f"{self.coll_done} of {self.coll_total} collectives")
        return "\n".join([head, *self.stuck[:12]])


class _Replay:
    def __init__(self, traces: dict[int, list[Record]], streams: str) -> None:
        assert streams in STREAM_MODELS, streams
        self.traces, self.streams_model = traces, streams
        self.pos = {rank: 0 for rank in traces}
        self.units: dict[tuple[int, int], list[Op]] = {}
        self.streams: dict[tuple, list[tuple[int, int]]] = {}   # stream -> posted units, in issue order
        self.slot: dict[tuple, int] = {}                         # (stream, unit) -> index in the stream
        self.head: dict[tuple, int] = {}                         # stream -> index of its first unfinished unit
        self.open: dict[tuple, list[Op]] = {}                    # match key -> posted ops, not done yet
        self.counters: dict[tuple, int] = {}
        self.ops: list[Op] = []
        self.errors: list[str] = []
        self.posted: set[tuple[int, int]] = set()                # (rank, record index)

    def unit_done(self, unit: tuple[int, int]) -> bool:
        return all(op.done for op in self.units[unit])

    def started(self, op: Op) -> bool:
        """Posted, and every earlier unit on its stream is done."""
        units, head = self.streams[op.stream], self.head[op.stream]
        while head < len(units) and self.unit_done(units[head]):
            head += 1
        self.head[op.stream] = head
        return self.slot[(op.stream, op.unit)] <= head

    def post(self, rank: int, record: Record) -> None:
        unit = (rank, record.unit)
        on_group_stream = record.kind == "coll" or self.streams_model == "group" or (
            self.streams_model == "torch" and record.batch is not None)
        stream = (rank, record.group, "group" if on_group_stream else record.peer)
        if record.kind == "coll":
            key: tuple = ("coll", record.group, self._count(("coll", record.group, rank)))
        else:
            src, dst = (rank, record.peer) if record.kind == "send" else (record.peer, rank)
            key = ("p2p", record.group, src, dst, self._count((record.kind, record.group, src, dst)))
        op = Op(rank, record, unit, key, stream)
        self.ops.append(op)
        self.open.setdefault(key, []).append(op)
        self.units.setdefault(unit, []).append(op)
        units = self.streams.setdefault(stream, [])
        self.head.setdefault(stream, 0)
        if (stream, unit) not in self.slot:
            self.slot[(stream, unit)] = len(units)
            units.append(unit)

    def _count(self, key: tuple) -> int:
        self.counters[key] = self.counters.get(key, 0) + 1
        return self.counters[key] - 1

    def issue(self, rank: int) -> bool:
        """Post this rank's ops until it reaches a wait (or blocking call) not yet done; True if it moved."""
        trace, moved = self.traces[rank], False
        while self.pos[rank] < len(trace):
            record = trace[self.pos[rank]]
            blocks = record.kind == "wait" or record.blocking
            if record.kind != "wait" and (rank, self.pos[rank]) not in self.posted:
                self.posted.add((rank, self.pos[rank]))
                self.post(rank, record)
                moved = True
            if blocks and not self.unit_done((rank, record.unit)):
                return moved
            self.pos[rank] += 1
            moved = True
        return moved

    def match(self) -> bool:
        moved = False
        for key, ops in list(self.open.items()):
            expected = 2 if key[0] == "p2p" else len(ops[0].record.members)
            if len(ops) < expected or not all(self.started(op) for op in ops):
                continue
            names = {op.record.name for op in ops} if key[0] == "coll" else set()
            sizes = {op.record.nbytes for op in ops} if key[0] == "p2p" else set()
            if len(names) > 1 or len(sizes) > 1:
                self.errors.append(f"mismatched {key}: " + "; ".join(op.describe() for op in ops))
                continue
            for op in ops:
                op.done = True
            del self.open[key]
            moved = True
        return moved

    def run(self) -> ReplayResult:
        while True:
            moved = any([self.issue(rank) for rank in self.traces])
            if not (self.match() or moved):
                break
        return self.result()

    def result(self) -> ReplayResult:
        p2p = [op for op in self.ops if op.record.kind != "coll"]
        coll = [op for op in self.ops if op.record.kind == "coll"]
        total_p2p = sum(r.kind in ("send", "recv") for t in self.traces.values() for r in t)
        total_coll = sum(r.kind == "coll" for t in self.traces.values() for r in t)
        finished = all(self.pos[r] == len(t) for r, t in self.traces.items())
        ok = finished and not self.errors and all(op.done for op in self.ops)
        stuck = list(dict.fromkeys(self.errors))
        for rank, trace in self.traces.items():
            if self.pos[rank] < len(trace):
                r = trace[self.pos[rank]]
                stuck.append(f"rank {rank} blocked at record {self.pos[rank]} of {len(trace)}: "
                             f"{r.kind} {r.name} (unit {r.unit}) at {r.where}")
        stuck += ["  pending " + op.describe() + ("" if self.started(op) else " [queued behind earlier ops]")
                  for op in self.ops if not op.done]
        return ReplayResult(ok, sum(op.done for op in p2p), total_p2p, sum(op.done for op in coll), total_coll,
                            stuck)


def replay(traces: dict[int, list[Record]], streams: str = "pair") -> ReplayResult:
    """Run per-rank traces under NCCL's rules (module docstring); `streams` picks which ops share a stream."""
    return _Replay(traces, streams).run()


def load_traces(directory: str | Path) -> dict[int, list[Record]]:
    """rank<N>.jsonl files written by Recorder.save."""
    traces = {}
    for path in sorted(Path(directory).glob("rank*.jsonl")):
        rank = int(path.stem[len("rank"):])
        traces[rank] = [Record(**json.loads(line)) for line in path.read_text().splitlines()]
    return traces


def p2p_only(traces: dict[int, list[Record]]) -> dict[int, list[Record]]:
    """The point-to-point ops and their waits alone (collectives dropped)."""
    out = {}
    for rank, trace in traces.items():
        p2p_units = {r.unit for r in trace if r.kind in ("send", "recv")}
        out[rank] = [r for r in trace if r.kind in ("send", "recv") or (r.kind == "wait" and r.unit in p2p_units)]
    return out
