"""Point-to-point order under NCCL's rules (tests/nccl_replay.py).

The replayer itself on hand-written traces (a known deadlock, known safe orders); the 1F1B
executor's own issue order for many (stages, micro-batches), every stage run in this process;
then the communication of real training runs (megasora.train.trainer.train in spawned gloo
workers, recorded in issue order) replayed with every send treated as a rendezvous: the
pipeline at pp2 / pp4 with its prefetch, ring attention at ring2 / ring4, USP (ulysses2 x
ring2), the pipeline with ring attention, and activation checkpointing (which re-runs the ring
in backward). One spawn per world size: process start-up dominates on 2 cores.

The executor this replaced prefetched on both ends of every link; its recorded runs (2 steps
of 4 micro-batches) stopped after 2 of 32 point-to-point ops at pp2, 12 of 96 at pp4, 132 of
1344 at pp2 x ring2 and 156 of 1728 with activation checkpointing; ring attention alone completed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nccl_replay import STREAM_MODELS, Record, load_traces, p2p_only, recording, replay

from megasora.parallel import pipeline_schedule
from megasora.parallel.p2p import Exchange

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 4
BASE = ["model.hidden=32", "model.heads=4", "model.depth=4", "model.mlp_ratio=2.0",
        "data.frames=3", "data.height=6", "data.width=6", "data.num_samples=16",
        "train.steps=2", "train.warmup_steps=0", "train.ema_decay=0", "train.zero_stage=1",
        "train.micro_batch_size=1", "diffusion.cond_frames_prob=1.0", "train.save_every=0"]
PIPE = ["parallel.pp=2", f"train.grad_accum={MICRO_BATCHES}"]
AC = ["train.activation_checkpointing=full"]

LAYOUTS = {  # name -> (world, overrides)
    "pp2": (2, PIPE),
    "ring2": (2, ["parallel.ring=2"]),
    "ring2_ac": (2, ["parallel.ring=2", *AC]),
    "pp4": (4, ["parallel.pp=4", f"train.grad_accum={MICRO_BATCHES}"]),
    "ring4": (4, ["parallel.ring=4"]),
    "ulysses2xring2": (4, ["parallel.ulysses=2", "parallel.ring=2"]),
    "pp2xring2": (4, [*PIPE, "parallel.ring=2"]),
    "pp2xring2_ac": (4, [*PIPE, "parallel.ring=2", *AC]),
}


# ---------------------------------------------------------------- the replayer on hand-written traces


def _send(unit: int, peer: int, batch: int | None = None, group: str = "g", blocking: bool = False) -> Record:
    return Record("send", unit, "isend", group, [0, 1], peer, 1 << 20, batch, blocking)


def _recv(unit: int, peer: int, batch: int | None = None, group: str = "g", blocking: bool = False) -> Record:
    return Record("recv", unit, "irecv", group, [0, 1], peer, 1 << 20, batch, blocking)


def _wait(unit: int) -> Record:
    return Record("wait", unit)


def test_issue_pp2_order_deadlocks():
    """The old executor's pp2 start: stage 0 isend(act 0), irecv(grad 0), isend(act 1); stage 1
    recv(act 0), irecv(act 1), isend(grad 0). After the first pair both wait in a receive."""
    stage0 = [_send(0, 1), _recv(1, 1), _send(2, 1), _wait(1), _wait(0), _wait(2)]
    stage1 = [_recv(0, 0, blocking=True), _recv(1, 0), _send(2, 0), _wait(1), _wait(2)]
    result = replay({0: stage0, 1: stage1})
    assert not result.ok
    assert (result.p2p_done, result.p2p_total) == (2, 6)
    assert any("blocked" in line for line in result.stuck)


def test_sends_first_on_both_ends_deadlock_but_one_batch_completes():
    """Both ranks isend then irecv: gloo buffers the sends, NCCL's rendezvous does not. The same
    exchange in one batch_isend_irecv (or ordered by parity) completes."""
    sends_first = {r: [_send(0, 1 - r), _recv(1, 1 - r), _wait(0), _wait(1)] for r in (0, 1)}
    assert not replay(sends_first).ok
    batched = {r: [_send(0, 1 - r, batch=0), _recv(0, 1 - r, batch=0), _wait(0)] for r in (0, 1)}
    assert replay(batched).ok
    by_parity = {0: [_send(0, 1), _recv(1, 1), _wait(0), _wait(1)], 1: [_recv(0, 0), _send(1, 0), _wait(0), _wait(1)]}
    result = replay(by_parity)
    assert result.ok and (result.p2p_done, result.p2p_total) == (4, 4)


def test_streams_are_per_group_and_messages_match_in_order():
    # the second send is queued behind the first on the same stream; the receiver takes them in order
    two_in_order = {0: [_send(0, 1), _send(1, 1), _wait(0), _wait(1)],
                    1: [_recv(0, 0), _recv(1, 0), _wait(0), _wait(1)]}
    assert replay(two_in_order).ok
    # each end receives before it sends: only when the two directions use different groups
    def crossed(group_back: str) -> dict[int, list[Record]]:
        return {0: [_recv(0, 1, group=group_back), _send(1, 1), _wait(1), _wait(0)],
                1: [_recv(0, 0), _send(1, 0, group=group_back), _wait(0), _wait(1)]}
    assert replay(crossed("h")).ok
    assert not replay(crossed("g")).ok
    # an unmatched receive never completes
    assert not replay({0: [_recv(0, 1), _wait(0)], 1: []}).ok


def test_stream_models_differ_on_ops_to_two_peers():
    """Rank 0 receives from 1, then sends to 2; 2 forwards to 1, which answers 0. With a stream per
    pair the send to 2 goes ahead; with one stream per group it queues behind the receive."""
    ring = {0: [_recv(0, 1), _send(1, 2), _wait(0), _wait(1)],
            1: [_recv(0, 2, blocking=True), _send(1, 0), _wait(1)],
            2: [_recv(0, 0, blocking=True), _send(1, 1), _wait(1)]}
    assert replay(ring, "pair").ok and replay(ring, "torch").ok
    assert not replay(ring, "group").ok
    batched = {r: [Record(**{**vars(x), "batch": x.unit}) if x.kind != "wait" else x for x in t]
               for r, t in ring.items()}
    assert not replay(batched, "torch").ok  # ProcessGroupNCCL runs a batch on the group's communicator


def test_blocking_call_stops_later_issue():
    """Rank 1's blocking recv of a message rank 0 sends only after receiving from rank 1."""
    result = replay({0: [_recv(0, 1, blocking=True), _send(1, 1), _wait(1)],
                     1: [_recv(0, 0, blocking=True), _send(1, 0), _wait(1)]})
    assert not result.ok and result.p2p_done == 0


def test_collectives_match_by_order_per_group():
    coll = [Record("coll", 0, "all_reduce", "w", [0, 1], blocking=True),
            Record("coll", 1, "broadcast", "w", [0, 1], blocking=True)]
    assert replay({0: coll, 1: coll}).ok
    swapped = [Record(**{**vars(coll[1]), "unit": 0}), Record(**{**vars(coll[0]), "unit": 1})]
    result = replay({0: coll, 1: swapped})
    assert not result.ok and "mismatched" in result.stuck[0]
    # a blocking collective on rank 0 before the send that rank 1 waits for before joining it
    result = replay({0: [Record("coll", 0, "all_reduce", "w", [0, 1], blocking=True), _send(1, 1), _wait(1)],
                     1: [_recv(0, 0, blocking=True), Record("coll", 1, "all_reduce", "w", [0, 1], blocking=True)]})
    assert not result.ok and result.coll_done == 0


# ---------------------------------------------------------------- the 1F1B executor, every stage in this process


def _stage_trace(stage: int, stages: int, micro_batches: int, prefetch: bool, monkeypatch) -> list[Record]:
    """What run_schedule asks p2p.exchange to do on one stage (a stand-in exchange records each call as
    one batch; its waits return at once, so one process can run every stage's schedule in turn)."""
    records: list[Record] = []

    class Handle:
        def __init__(self, unit: int) -> None:
            self.unit = unit

        def wait(self) -> None:
            records.append(Record("wait", self.unit))

    def recorded_exchange(sends, recvs, group, tag=0) -> Exchange:
        unit = len(records)
        for kind, messages in (("send", sends), ("recv", recvs)):
            records.extend(Record(kind, unit, "batch_" + kind, "pp", list(range(stages)), peer,
                                  t.numel() * t.element_size(), unit) for t, peer in messages)
        return Exchange([Handle(unit)] if sends or recvs else [])

    monkeypatch.setattr(pipeline_schedule, "exchange", recorded_exchange)
    link = pipeline_schedule.StageLink.from_ranks(None, list(range(stages)), stage)
    fns = pipeline_schedule.StageFunctions(forward=lambda i, x: torch.zeros(4, 3),
                                           backward=lambda i, x, out, grad: torch.zeros(4, 3),
                                           message_shape=lambda i: (4, 3))
    order = pipeline_schedule.one_f_one_b(stage, stages, micro_batches)
    pipeline_schedule.run_schedule(order, link, fns, torch.float32, torch.device("cpu"), prefetch)
    return records


@pytest.mark.parametrize("streams", ["pair", "group"])  # every op is batched here: "torch" is "group"
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("stages,micro_batches", [(2, 2), (2, 4), (2, 7), (3, 3), (3, 8), (4, 4), (4, 9), (5, 6),
                                                  (4, 2), (5, 4)])  # fewer micro-batches than stages too
def test_one_f_one_b_executor_order_completes(stages, micro_batches, prefetch, streams, monkeypatch):
    traces = {s: _stage_trace(s, stages, micro_batches, prefetch, monkeypatch) for s in range(stages)}
    result = replay(traces, streams)
    assert result.ok, result.summary()
    assert result.p2p_total == 4 * micro_batches * (stages - 1)  # activation + gradient, both ends, per link


# ---------------------------------------------------------------- real runs, recorded and replayed


def _trace_worker(rank: int, world: int, cases: list[tuple[str, list[str]]], root: str) -> None:
    from megasora.config import load_config
    from megasora.train.trainer import train
    for name, overrides in cases:
        cfg = load_config(REPO / "configs" / "tiny.yaml", [*BASE, *overrides, f"run.dir={root}/{name}"])
        with recording() as trace:
            train(cfg)
        trace.save(Path(root) / name / "trace" / f"rank{rank}.jsonl")


@pytest.fixture(scope="module")
def traced_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nccl_order")
    for world in sorted({w for w, _ in LAYOUTS.values()}):
        run_launched(_trace_worker, world, [(n, o) for n, (w, o) in LAYOUTS.items() if w == world], str(root))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_communication_completes_under_nccl_rules(traced_runs, layout):
    traces = load_traces(traced_runs / layout / "trace")
    assert len(traces) == LAYOUTS[layout][0]
    for streams in STREAM_MODELS:
        p2p = replay(p2p_only(traces), streams)
        assert p2p.p2p_total > 0, "no point-to-point ops recorded: the check would be vacuous"
        assert p2p.ok, f"{layout}, {streams} streams: {p2p.summary()}"
        full = replay(traces, streams)  # with the collectives, each a rendezvous of its group
        assert full.ok and full.coll_total > 0, f"{layout}, {streams} streams, with collectives: {full.summary()}"
