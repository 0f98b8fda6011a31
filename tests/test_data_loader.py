"""Shards round-trip, bucketed epoch plans, resumable/elastic streams, corrupt-member handling."""
import json
import tarfile

import numpy as np
import pytest
import torch

from megasora.data.buckets import BucketRule, plan_epoch
from megasora.data.shard_stream import ShardIndex, ShardStream
from megasora.data.shards import Sample, write_shard

SHAPES = [(2, 4, 6), (2, 6, 4), (1, 4, 4), (3, 4, 4)]  # latent (T, H, W) buckets


def make_samples(n: int, start: int, rng: np.random.Generator) -> list[Sample]:
    samples = []
    for i in range(start, start + n):
        t, h, w = SHAPES[i % len(SHAPES)]
        mask = np.arange(5) < 1 + i % 5
        samples.append(Sample(f"{i:08d}_0000", rng.standard_normal((3, t, h, w)).astype(np.float32),
                              rng.standard_normal((5, 8)).astype(np.float32), mask,
                              {"source": f"clip{i}.mp4", "caption": f"caption {i}", "frames": 4 * t - 3}))
    return samples


@pytest.fixture
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    per_shard = [7, 5, 9, 3, 6]
    start = 0
    for shard, n in enumerate(per_shard):
        write_shard(tmp_path, shard, make_samples(n, start, rng))
        start += n
    return tmp_path


def stream(directory, dp_rank=0, dp_size=1, grad_accum=1, seed=0, rule=None, shuffle_shards=0, prefetch=False):
    rule = rule or BucketRule(patch=(1, 2, 2), micro_batch_size=3)
    return ShardStream(ShardIndex.load(directory, rule), rule, seed, grad_accum, dp_rank, dp_size,
                       shuffle_shards, prefetch=prefetch)


def test_shards_round_trip_exactly(tmp_path):
    import webdataset as wds

    samples = make_samples(6, 0, np.random.default_rng(1))
    write_shard(tmp_path, 0, samples)
    src = stream(tmp_path)
    for i, s in enumerate(samples):
        # Loader path (indexed random access).
        batch = src.load([i])
        assert torch.equal(batch["latents"][0], torch.from_numpy(s.latents))
        loaded = src._read(i)
        assert loaded.key == s.key and loaded.meta == s.meta
        assert np.array_equal(loaded.latents, s.latents) and loaded.latents.dtype == np.float32
        assert np.array_equal(loaded.text_emb, s.text_emb) and np.array_equal(loaded.text_mask, s.text_mask)
    # Plain webdataset streaming reads the same shard (standard key.field layout).
    streamed = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).decode())
    assert [d["__key__"] for d in streamed] == [s.key for s in samples]
    for d, s in zip(streamed, samples):
        assert np.array_equal(d["latents.npy"], s.latents) and d["json"] == s.meta


def test_buckets_hold_one_shape_and_epoch_covers_every_sample_once(shard_dir):
    for shuffle_shards in (0, 2):
        src = stream(shard_dir, shuffle_shards=shuffle_shards)
        plan = src.plan(0)
        for mb in plan:
            assert len({src.index.shapes[i] for i in mb}) == 1
            assert 1 <= len(mb) <= 3
        assert sorted(i for mb in plan for i in mb) == list(range(len(src.index)))
        assert plan != src.plan(1)  # reshuffled each epoch


@pytest.mark.parametrize("dp_size,grad_accum", [(1, 1), (2, 1), (3, 2)])
def test_every_sample_once_per_epoch_across_dp_ranks(shard_dir, dp_size, grad_accum):
    n = len(ShardIndex.load(shard_dir))
    seen, counters = [], set()
    ranks = [iter(stream(shard_dir, r, dp_size, grad_accum).steps(0)) for r in range(dp_size)]
    while True:
        steps = [next(it) for it in ranks]
        assert len({s.samples_after for s in steps}) == 1  # all ranks agree on the counter
        assert all(len(s.micro_batches) == grad_accum for s in steps)
        for s in steps:
            for mb in s.micro_batches:
                assert mb["latents"].shape[0] == mb["ids"].shape[0] == mb["text_emb"].shape[0]
                assert mb["text_mask"].dtype == torch.bool and mb["latents"].dtype == torch.float32
                seen += mb["ids"].tolist()
        counters.add(steps[0].samples_after)
        if steps[0].samples_after >= n:
            break
    # Steps may run into epoch 1; the first n stream positions are exactly epoch 0.
    assert sorted(seen[:n]) == list(range(n))
    assert len(set(seen[:n])) == n


def take(src, start, num_steps):
    out, it = [], src.steps(start)
    for _ in range(num_steps):
        step = next(it)
        out.append(([mb["ids"].tolist() for mb in step.micro_batches], step.samples_after))
    return out


def test_resume_from_counter_reproduces_ids_even_with_other_dp_size(shard_dir):
    full = take(stream(shard_dir, prefetch=True), 0, 20)  # 20 steps = several epochs
    resume_at = full[6][1]
    resumed = take(stream(shard_dir), resume_at, 13)
    assert resumed == full[7:]
    # Elastic: resume the same global stream on 2 dp ranks; rank 0 then rank 1 per step.
    r0, r1 = take(stream(shard_dir, 0, 2), resume_at, 4), take(stream(shard_dir, 1, 2), resume_at, 4)
    flat_single = [ids for mbs, _ in full[7:] for ids in mbs]
    flat_elastic = [ids for a, b in zip(r0, r1) for ids in a[0] + b[0]]
    assert flat_elastic == flat_single[:8]
    # A counter inside a micro-batch cannot come from a checkpoint: refuse it loudly.
    step = next(i for i in range(7, 20) if len(full[i][0][0]) > 1)
    with pytest.raises(ValueError, match="micro-batch boundary"):
        next(stream(shard_dir).steps(full[step - 1][1] + 1))


def test_seed_changes_order_deterministically(shard_dir):
    assert take(stream(shard_dir, seed=1), 0, 5) == take(stream(shard_dir, seed=1), 0, 5)
    assert take(stream(shard_dir, seed=1), 0, 5) != take(stream(shard_dir, seed=2), 0, 5)


def test_token_target_scales_batch_per_bucket():
    rule = BucketRule(patch=(1, 2, 2), tokens_per_microbatch=48, max_micro_batch=5)
    assert rule.tokens((2, 4, 6)) == 12 and rule.batch_size((2, 4, 6)) == 4
    assert rule.tokens((1, 4, 4)) == 4 and rule.batch_size((1, 4, 4)) == 5  # capped (12 -> 5)
    assert rule.batch_size((8, 32, 32)) == 1  # never 0
    shapes = [(2, 4, 6)] * 9 + [(1, 4, 4)] * 11
    plan = plan_epoch(shapes, np.zeros(20, dtype=np.int64), rule, seed=0, epoch=0)
    sizes = sorted((shapes[mb[0]], len(mb)) for mb in plan)
    assert sizes == [((1, 4, 4), 1), ((1, 4, 4), 5), ((1, 4, 4), 5), ((2, 4, 6), 1), ((2, 4, 6), 4),
                     ((2, 4, 6), 4)]


def corrupt_member(directory, shard: int, sample_pos: int, field: str) -> str:
    index = json.loads((directory / f"shard-{shard:06d}.json").read_text())
    entry = index["samples"][sample_pos]
    offset, size = entry["members"][field]
    with open(directory / f"shard-{shard:06d}.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\x00garbage!" * (size // 9))
    return entry["key"]


def test_corrupt_member_is_skipped_and_counted(shard_dir):
    clean = take(stream(shard_dir), 0, 12)
    bad_key = corrupt_member(shard_dir, 1, 2, "latents.npy")
    src = stream(shard_dir)
    bad_id = src.index.keys.index(bad_key)
    got = take(src, 0, 12)
    assert src.stats()["data/corrupt_samples"] >= 1
    flat_clean = [i for mbs, _ in clean for mb in mbs for i in mb]
    flat_got = [i for mbs, _ in got for mb in mbs for i in mb]
    assert bad_id in flat_clean and bad_id not in flat_got
    assert [i for i in flat_clean if i != bad_id] == flat_got
    assert [a for _, a in clean] == [a for _, a in got]  # the global counter is unaffected


def test_fully_unreadable_micro_batch_is_substituted(shard_dir):
    rule = BucketRule(patch=(1, 2, 2), micro_batch_size=1)
    first = stream(shard_dir, rule=rule).plan(0)[0][0]
    index = ShardIndex.load(shard_dir)
    shard, key = int(index.shard_of[first]), index.keys[first]
    pos = [e["key"] for e in json.loads((shard_dir / f"shard-{shard:06d}.json").read_text())["samples"]].index(key)
    corrupt_member(shard_dir, shard, pos, "text_emb.npy")
    src = stream(shard_dir, rule=rule)
    step = next(src.steps(0))
    assert len(step.micro_batches) == 1 and step.micro_batches[0]["ids"].tolist() != [first]
    assert step.samples_after == 1
    assert src.stats() == {"data/corrupt_samples": 1, "data/substituted_microbatches": 1}


def test_truncated_shard_is_not_fatal(shard_dir):
    tar = shard_dir / "shard-000004.tar"
    tar.write_bytes(tar.read_bytes()[:2000])
    src = stream(shard_dir)
    n = len(src.index)
    seen = [i for mbs, _ in take(src, 0, 10) for mb in mbs for i in mb]
    assert src.stats()["data/corrupt_samples"] > 0 and len(seen) > 0
    assert tarfile.is_tarfile(shard_dir / "shard-000000.tar") and n == 30


def test_config_builds_bucketed_source_and_checks_compatibility(shard_dir):
    from megasora.config import load_config
    from megasora.data.shard_stream import build_shard_stream

    overrides = [f"data.shards={shard_dir}", "data.kind=shards", "data.tokens_per_microbatch=24",
                 "model.in_channels=3", "text.dim=8", "train.grad_accum=2"]
    src = build_shard_stream(load_config(None, overrides), dp_rank=1, dp_size=2)
    step = next(src.steps(0))
    assert len(step.micro_batches) == 2
    for mb in step.micro_batches:  # 24 tokens per micro-batch: 4-token samples x6, 6-token x4, 12-token x2 ...
        n, _, t, h, w = mb["latents"].shape
        assert n == max(1, 24 // (t * (h // 2) * (w // 2)))
    with pytest.raises(ValueError, match="text.dim=16"):
        build_shard_stream(load_config(None, overrides[:-3] + ["model.in_channels=3", "text.dim=16"]), 0, 1)
