"""Each sequence rank's data stream loads only its span of a clip (issue 22 item 1).

The stream reads only the latent frames of the rank's TokenSpan from storage (data/stream.py
SpanCut) before the micro-batch is stacked, and keeps the whole clip's (T, H, W) in
`clip_shape`; the objective takes that cut batch as it is. Checked on real shards (written with
data/shards.py as tests/test_data_loader.py does): a ring2 rank's host batch holds only its
span's frames, equal to the whole clip's, the token count stays the whole clip's; and ring2
training on those shards equals one process (losses, gradient norms, parameters).
"""
from __future__ import annotations

from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_data_loader import make_samples
from test_golden import _full_params, _grad_norms

from megasora.config import load_config
from megasora.data.buckets import BucketRule
from megasora.data.shard_stream import ShardIndex, ShardStream
from megasora.data.shards import read_latent_frames, write_shard
from megasora.data.stream import SpanCut
from megasora.data.synthetic import render_clip
from megasora.parallel.sequence import sequence_span
from megasora.train.objective import FlowMatchingObjective

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
PATCH = (1, 2, 2)
STEPS = 8
# Shards hold (2,4,6), (2,6,4), (1,4,4), (3,4,4) latents (12, 12, 4, 12 tokens): at ring2 a span is
# one of two frames, frames {0,1} / {1,2} of three (a shared partial frame) or the only frame.
TRAIN = ["model.hidden=32", "model.heads=4", "model.depth=2", "model.mlp_ratio=2.0", "data.kind=shards",
         "model.in_channels=3", "text.dim=8", "text.max_length=5", f"train.steps={STEPS}", "train.warmup_steps=0",
         "train.lr=1e-2", "train.ema_decay=0", "train.zero_stage=2", "train.grad_clip=1.0",
         "train.micro_batch_size=3", "diffusion.cond_masks.first_frame=0.3", "diffusion.cond_masks.random=0.3"]


@pytest.fixture
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    start = 0
    for shard, n in enumerate([7, 5, 9]):
        write_shard(tmp_path / "shards", shard, make_samples(n, start, rng))
        start += n
    return tmp_path / "shards"


def _stream(directory: Path, cut: SpanCut | None) -> ShardStream:
    rule = BucketRule(patch=PATCH, micro_batch_size=3)
    return ShardStream(ShardIndex.load(directory, rule), rule, 0, 1, 0, 1, prefetch=False, cut=cut)


def test_a_ring2_ranks_host_batch_holds_only_its_spans_frames(shard_dir):
    whole = _stream(shard_dir, None)
    ranks = [_stream(shard_dir, SpanCut(partial(sequence_span, shards=2, index=r), PATCH)) for r in (0, 1)]
    objective = FlowMatchingObjective(load_config(None, [*TRAIN, f"data.shards={shard_dir}"]))
    shapes = set()
    for steps in zip(*(s.steps(0) for s in [whole, *ranks]), range(8)):
        full, *cut = (step.micro_batches[0] for step in steps[:3])
        t, h, w = full["latents"].shape[2:]
        shapes.add((t, h, w))
        spans = [sequence_span((t, h // 2, w // 2), 2, r) for r in (0, 1)]
        for batch, span in zip(cut, spans):
            frames = slice(span.first_frame, span.end_frame)
            assert batch["latents"].shape == (full["latents"].shape[0], 3, frames.stop - frames.start, h, w)
            assert torch.equal(batch["latents"], full["latents"][:, :, frames])
            assert batch["clip_shape"].tolist() == [t, h, w] and torch.equal(batch["ids"], full["ids"])
            assert objective.tokens_per_sample(batch) == t * (h // 2) * (w // 2)  # the whole clip's tokens
        if t > 1:  # the rank never holds the whole clip
            assert all(b["latents"].shape[2] < t for b in cut)
    assert {(2, 4, 6), (3, 4, 4)} <= shapes  # a clean split and a shared partial frame were both seen


class _CountingFile:
    """A shard file that counts the bytes read from it."""

    def __init__(self, path: Path, counter: list[int]) -> None:
        self.file, self.counter = open(path, "rb"), counter

    def seek(self, offset: int) -> int:
        return self.file.seek(offset)

    def tell(self) -> int:
        return self.file.tell()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.counter[0] += len(data)
        return data

    def close(self) -> None:
        self.file.close()


def _bytes_read(stream: ShardStream, steps: int) -> tuple[int, list[dict]]:
    counter = [0]
    stream._handles = {k: _CountingFile(path, counter) for k, path in enumerate(stream.index.tars)}
    batches = [step.micro_batches[0] for step in islice(stream.steps(0), steps)]  # zip would read one more
    return counter[0], batches


def test_a_rank_reads_only_its_spans_frames_from_storage(shard_dir):
    """Bytes read from the tar files: a ring2 rank reads exactly the whole stream's bytes minus
    the latent frames outside its span (C x H x W x 4 bytes per frame it skips)."""
    whole_bytes, batches = _bytes_read(_stream(shard_dir, None), 8)
    for rank in (0, 1):
        cut = SpanCut(partial(sequence_span, shards=2, index=rank), PATCH)
        rank_bytes, cut_batches = _bytes_read(_stream(shard_dir, cut), 8)
        skipped = 0
        for full, part in zip(batches, cut_batches):
            b, c, t, h, w = full["latents"].shape
            first, end = cut.frame_range((t, h, w))
            skipped += b * c * (t - (end - first)) * h * w * 4
            assert torch.equal(part["latents"], full["latents"][:, :, first:end])
        assert skipped > 0 and rank_bytes == whole_bytes - skipped, (rank, rank_bytes, whole_bytes, skipped)

def test_synthetic_spans_render_the_whole_clips_frames():
    video, caption = render_clip(0, 5, 5, 8, 8)
    for r in range(3):
        frames = SpanCut(partial(sequence_span, shards=3, index=r), PATCH).frames((5, 8, 8))
        part, same = render_clip(0, 5, 5, 8, 8, only=frames)
        assert same == caption and np.array_equal(part, video[:, frames])


def _train_worker(rank: int, world: int, parallel: list[str], root: str, shards: str):
    from megasora.train.trainer import train
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [*TRAIN, f"data.shards={shards}", *parallel, f"run.dir={root}/{world}"])
    losses = train(cfg).losses
    dist.barrier()
    result = (losses, _full_params(cfg, world), _grad_norms(Path(cfg.run.dir)))
    return result if rank == 0 else None


def test_ring2_on_cut_shards_equals_one_process(shard_dir, tmp_path):
    ref_losses, ref_params, ref_norms = run_launched(_train_worker, 1, [], str(tmp_path), str(shard_dir))[0]
    losses, params, norms = run_launched(_train_worker, 2, ["parallel.ring=2"], str(tmp_path), str(shard_dir))[0]
    assert sorted(losses) == list(range(1, STEPS + 1)) and max(ref_norms.values()) > 0.1
    assert abs(ref_losses[STEPS] - ref_losses[1]) > 1e-2 * ref_losses[1], "training did not move"
    for step, ref in ref_losses.items():
        assert abs(losses[step] - ref) <= 1e-5 * abs(ref), f"step {step}: {losses[step]} vs {ref}"
        assert abs(norms[step] - ref_norms[step]) <= 1e-5 * ref_norms[step], f"step {step} grad norm"
    for name, ref in ref_params.items():
        err = (params[name] - ref).abs().max().item()
        assert err <= 1e-4, f"parameter {name} differs by {err:.2e}"


def test_a_span_of_padding_only_reads_no_frames(shard_dir):
    """18 tokens over 7 ranks (3 each, 21 padded): the last rank holds padding only; it reads an
    empty run of frames rather than failing the sample as unreadable."""
    cut = SpanCut(partial(sequence_span, shards=7, index=6), (1, 1, 1))
    assert cut.frame_range((2, 3, 3)) == (2, 2) and cut.frames((2, 3, 3)) == []
    index = ShardIndex.load(shard_dir, BucketRule(patch=PATCH, micro_batch_size=3))
    with open(index.tars[index.shard_of[0]], "rb") as handle:
        rows = read_latent_frames(handle, index.spans[0]["latents.npy"], (1, 1))
    assert rows.shape == (3, 0, *index.shapes[0][1:])
