"""Just-in-time inputs in the pipeline loop (train/pipeline_loop.py): each stage noises a
micro-batch once, through the flow objective's own `inputs`, when its forward is about to run
(or, on a stage that posts receives early, when that forward's receive is posted), never the
whole step's micro-batches up front. pp3 with 6 micro-batches: stage 2 posts early, stage 1
does not, stage 0 receives nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
STAGES, MICRO_BATCHES = 3, 6
CONFIG = ["model.hidden=32", "model.heads=4", "model.depth=3", "model.mlp_ratio=2.0", "data.frames=3",
          "data.height=6", "data.width=6", "data.num_samples=8", "train.steps=1", "train.warmup_steps=0",
          "train.ema_decay=0", "train.micro_batch_size=1", f"train.grad_accum={MICRO_BATCHES}",
          f"parallel.pp={STAGES}", "diffusion.cond_frames_prob=0.5"]


def _record_worker(rank: int, world: int, run_dir: str) -> tuple[int, list[tuple[str, int]]]:
    """One training step; this stage's events in order: ("build", i), forward i done ("F", i), backward i done ("B", i)."""
    from megasora.config import load_config
    from megasora.train.objective import FlowMatchingObjective
    from megasora.train.pipeline_loop import PipelineTrainingLoop
    from megasora.train.trainer import train
    events: list[tuple[str, int]] = []
    index: dict[tuple[int, ...], int] = {}
    build, stage_functions = FlowMatchingObjective.inputs, PipelineTrainingLoop.stage_functions

    def recording_inputs(self, batch, *args):
        events.append(("build", index[tuple(batch["ids"].tolist())]))
        return build(self, batch, *args)

    def recording_functions(self, micro_batches, step, losses):
        index.update({tuple(m["ids"].tolist()): i for i, m in enumerate(micro_batches)})
        fns = stage_functions(self, micro_batches, step, losses)
        forward, backward = fns.forward, fns.backward

        def recorded_forward(i, received):
            out = forward(i, received)
            events.append(("F", i))  # forward i done
            return out

        def recorded_backward(i, *args):
            grad = backward(i, *args)
            events.append(("B", i))  # backward i done
            return grad

        fns.forward, fns.backward = recorded_forward, recorded_backward
        return fns

    FlowMatchingObjective.inputs = recording_inputs
    PipelineTrainingLoop.stage_functions = recording_functions
    train(load_config(REPO / "configs" / "tiny.yaml", CONFIG + [f"run.dir={run_dir}"]))
    return rank, events  # the global rank is the stage (pp only)


@pytest.fixture(scope="module")
def stage_events(tmp_path_factory) -> dict[int, list[tuple[str, int]]]:
    return dict(run_launched(_record_worker, STAGES, str(tmp_path_factory.mktemp("jit"))))


@pytest.mark.slow
def test_each_micro_batch_is_noised_once_just_before_its_forward(stage_events):
    for stage, events in stage_events.items():
        builds = [i for kind, i in events if kind == "build"]
        assert sorted(builds) == list(range(MICRO_BATCHES)), f"stage {stage}: {events}"
        built, forwarded, done = set(), set(), set()
        for kind, i in events:
            if kind == "build":
                built.add(i)
                # not yet forwarded: only this one (posted early: plus the one about to run)
                assert len(built - forwarded) <= (2 if stage == 2 else 1), f"stage {stage}: {events}"
                # alive: 1F1B's in-flight micro-batches plus the one just built
                assert len(built - done) <= min(STAGES - stage, MICRO_BATCHES) + 1, f"stage {stage}: {events}"
            elif kind == "F":
                assert i in built
                forwarded.add(i)
            else:
                done.add(i)
        if stage < 2:  # built inside or right before its forward: nothing waits across another action
            assert all(events[k + 1] == ("F", i) for k, (kind, i) in enumerate(events) if kind == "build"), events
