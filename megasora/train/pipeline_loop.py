"""The training step for parallel.pp > 1: 1F1B over the step's micro-batches, one DeepSpeed engine per stage.

Each rank wraps only its stage (megasora/parallel/pipeline.py) in an ordinary DeepSpeed
engine built with the MeshMPU, so ZeRO, gradient averaging over dp / summing over sp, and
gradient clipping (norm summed over the tp x pp `mp` group) are DeepSpeed's own. The step
drives that engine in the 1F1B order (megasora/parallel/pipeline_schedule.py):

- last stage: loss = masked MSE of its prediction; engine.backward(loss) scales by
  1/grad_accum like the single-process loop;
- other stages: engine.backward(sum(output * grad_from_next_stage)), whose gradient with
  respect to `output` is exactly that received gradient; it already carries the 1/grad_accum
  factor, so scale_wrt_gas=False;
- engine.step() after every backward: DeepSpeed counts micro-steps and steps the optimizer
  at the last one, exactly as in TrainingLoop.forward_backward.

Every stage draws the micro-batch's noise itself (keyed by seed, sample id, step), so the
first stage has its input and the last its target without sending either. It does so just in
time, through the objective's `inputs` (the single-process loop's very noising): when the
micro-batch's forward runs, or, on a stage that posts receives early, when the receive of
that forward is posted (the message's shape depends on the draws: conditioning frames make
the timesteps per token). The forward consumes them; what backward needs, autograd keeps
until that backward, so a stage holds the inputs of its in-flight micro-batches (1F1B: at most
stages - stage) plus at most the one whose receive is posted, never the whole step's.
Only the last stage has the losses: it broadcasts their mean (on the device) to the other
stages, and TrainingLoop.train_step does the rest (EMA, mean over dp, statistics).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megasora.config import Config
from megasora.models import build_dit
from megasora.models.dit import DiT
from megasora.parallel.mesh import Mesh
from megasora.parallel.pipeline import DiTStage, build_stage
from megasora.parallel.pipeline_schedule import StageFunctions, StageLink, one_f_one_b, run_schedule
from megasora.train.loop import Measured, TrainingLoop
from megasora.train.objective import FlowInputs, FlowMatchingObjective
from megasora.train.universal import universal_checkpoint_info


def pipeline_stage(cfg: Config, model: DiT, mesh: Mesh) -> DiTStage:
    """This rank's stage of the (already parallelized) model."""
    return build_stage(model, mesh.rank_in("pp"), mesh.size("pp"), cfg.parallel.pp_boundaries or None)


class PipelineTrainingLoop(TrainingLoop):
    """TrainingLoop whose step runs the 1F1B schedule; everything else (data, metrics, saves) is shared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mesh: Mesh = self.parallel.mpu.mesh
        self.stage: DiTStage = self.engine.module
        self.pp_group, self.last_stage_rank = mesh.group("pp"), mesh.ranks["pp"][-1]
        self.link = StageLink.from_ranks(mesh.group("pp"), mesh.ranks["pp"], mesh.rank_in("pp"))
        if not isinstance(self.objective, FlowMatchingObjective):  # stages need its inputs(), not only a loss
            raise TypeError(f"the pipeline trains the DiT's flow objective, not {type(self.objective).__name__}")
        self.flow = self.objective

    def stage_functions(self, micro_batches: list[dict[str, Any]], step: int,
                        losses: list[torch.Tensor]) -> StageFunctions:
        engine, stage = self.engine, self.stage
        pending: dict[int, FlowInputs] = {}  # built for a posted receive, forward not run yet

        def inputs(i: int) -> FlowInputs:
            if i not in pending:
                pending[i] = self.flow.inputs(micro_batches[i], step, self.dtype, self.device)
            return pending[i]

        def forward(i: int, received: Optional[torch.Tensor]) -> torch.Tensor:
            micro = inputs(i)
            del pending[i]  # from here on autograd holds what backward needs
            out = engine(*micro.model_args(), received, **micro.model_kwargs())
            if stage.is_last:
                out = micro.loss(out)
                losses.append(out.detach())
            return out

        def backward(i: int, received: Optional[torch.Tensor], out: torch.Tensor,
                     grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if grad is None:
                engine.backward(out)
            else:
                engine.backward((out.float() * grad.float()).sum(), scale_wrt_gas=False)
            return None if received is None else received.grad

        def message_shape(i: int) -> tuple[int, ...]:
            micro = inputs(i)
            return stage.message_shape(micro.x_t, micro.t, micro.text, micro.grid)

        return StageFunctions(forward, backward, message_shape, after_backward=lambda i: engine.step())

    def forward_backward(self, micro_batches: list[dict[str, Any]], step: int) -> Measured:
        """This stage's part of 1F1B over the step's micro-batches; every stage returns the mean loss."""
        losses: list[torch.Tensor] = []
        order = one_f_one_b(self.stage.stage, self.stage.stages, len(micro_batches))
        functions = self.stage_functions(micro_batches, step, losses)
        times = run_schedule(order, self.link, functions, self.dtype, self.device)
        self.accounting.add("fwd", times.forward)
        self.accounting.add("bwd", times.backward)
        self.accounting.add("pp_recv", times.recv_wait)
        self.accounting.add("pp_send", times.send_wait)
        loss = torch.stack(losses).double().mean() if losses else torch.zeros((), dtype=torch.float64,
                                                                              device=self.device)
        dist.broadcast(loss, self.last_stage_rank, group=self.pp_group)  # only the last stage has it
        return Measured({"loss": loss}, local={"pp_bubble": 1.0 - times.busy / times.wall})

    def universal_info(self) -> dict[str, Any]:
        """Of the WHOLE DiT, not of this stage: DeepSpeed's ds_to_universal applies mp_rank_00's
        (stage 0's) to every parameter. Built on the meta device: names only, no memory."""
        with torch.device("meta"):
            return universal_checkpoint_info(build_dit(self.cfg))
