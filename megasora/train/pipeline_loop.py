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
first stage has its input and the last its target without sending either. Only the last
stage has the losses: it broadcasts their mean (on the device) to the other stages, and
TrainingLoop.train_step does the rest (EMA, mean over dp, statistics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megasora.config import Config
from megasora.diffusion.flow import masked_mse, noise_batch
from megasora.models.dit import DiT
from megasora.parallel.mesh import Mesh
from megasora.parallel.pipeline import DiTStage, build_stage
from megasora.parallel.pipeline_schedule import StageFunctions, StageLink, one_f_one_b, run_schedule
from megasora.train.loop import Measured, TrainingLoop


def pipeline_stage(cfg: Config, model: DiT, mesh: Mesh) -> DiTStage:
    """This rank's stage of the (already parallelized) model."""
    return build_stage(model, mesh.rank_in("pp"), mesh.size("pp"), cfg.parallel.pp_boundaries or None)


@dataclass
class StageInput:
    """One micro-batch as every stage sees it (model inputs, and the loss terms for the last stage)."""
    x_t: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    drop_text: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor

    def model_args(self) -> tuple[torch.Tensor, ...]:
        return self.x_t, self.t, self.text, self.text_mask, self.drop_text


class PipelineTrainingLoop(TrainingLoop):
    """TrainingLoop whose step runs the 1F1B schedule; everything else (data, metrics, saves) is shared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mesh: Mesh = self.parallel.mpu.mesh
        self.stage: DiTStage = self.engine.module
        self.pp_group, self.last_stage_rank = mesh.group("pp"), mesh.ranks["pp"][-1]
        self.link = StageLink.from_ranks(mesh.group("pp"), mesh.ranks["pp"], mesh.rank_in("pp"))

    def stage_input(self, micro: dict[str, Any], step: int) -> StageInput:
        """Exactly what FlowMatchingObjective feeds the model and the loss."""
        x0 = micro["latents"].to(device=self.device, dtype=self.dtype)
        pt, ph, pw = self.cfg.model.patch
        noised = noise_batch(x0, micro["ids"], step, self.cfg.train.seed, self.cfg.diffusion, (pt, ph, pw))
        return StageInput(noised.x_t, noised.t_tokens.to(self.dtype),
                          micro["text_emb"].to(device=self.device, dtype=self.dtype),
                          micro["text_mask"].to(self.device), noised.drop_text, noised.target, noised.loss_mask)

    def stage_functions(self, inputs: list[StageInput], losses: list[torch.Tensor]) -> StageFunctions:
        engine, stage = self.engine, self.stage

        def forward(i: int, received: Optional[torch.Tensor]) -> torch.Tensor:
            out = engine(*inputs[i].model_args(), received)
            if stage.is_last:
                out = masked_mse(out, inputs[i].target, inputs[i].loss_mask)
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
            return stage.message_shape(inputs[i].x_t, inputs[i].t, inputs[i].text)

        return StageFunctions(forward, backward, message_shape, after_backward=lambda i: engine.step())

    def forward_backward(self, micro_batches: list[dict[str, Any]], step: int) -> Measured:
        """This stage's part of 1F1B over the step's micro-batches; every stage returns the mean loss."""
        inputs = [self.stage_input(micro, step) for micro in micro_batches]
        losses: list[torch.Tensor] = []
        order = one_f_one_b(self.stage.stage, self.stage.stages, len(micro_batches))
        times = run_schedule(order, self.link, self.stage_functions(inputs, losses), self.dtype, self.device)
        self.accounting.add("fwd", times.forward)
        self.accounting.add("bwd", times.backward)
        self.accounting.add("pp_recv", times.recv_wait)
        self.accounting.add("pp_send", times.send_wait)
        loss = torch.stack(losses).double().mean() if losses else torch.zeros((), dtype=torch.float64,
                                                                              device=self.device)
        dist.broadcast(loss, self.last_stage_rank, group=self.pp_group)  # only the last stage has it
        return Measured({"loss": loss}, local={"pp_bubble": 1.0 - times.busy / times.wall})

    def client_state(self, step: int, samples: int) -> dict[str, Any]:
        """Every stage's checkpoint file describes the WHOLE model (EMA and the universal TP plan).

        Resuming on another layout reads one file: DeepSpeed's ds_to_universal takes the
        universal_checkpoint_info of mp_rank_00 (stage 0) for every parameter, and the trainer
        restores the EMA from the file of the resuming rank's own mp rank.
        """
        client = super().client_state(step, samples)
        parts: list[Any] = [None] * self.stage.stages
        dist.all_gather_object(parts, (client["ema"], client["universal_checkpoint_info"]), group=self.pp_group)
        if client["ema"] is not None:
            client["ema"] = {name: tensor for ema, _ in parts for name, tensor in ema.items()}
        info = dict(client["universal_checkpoint_info"])
        for key, value in info.items():
            if isinstance(value, list):  # parameter-name patterns: the union over stages
                info[key] = [pattern for _, stage_info in parts for pattern in stage_info[key]]
        client["universal_checkpoint_info"] = info
        return client
