"""Read videos (PyAV) and images (Pillow) into fixed-fps clips at a bucketed native resolution.

A clip is uint8 (T, H, W, 3). Frames are picked at a target fps by nearest-earlier
timestamp while decoding (no whole-video buffering), resized with swscale to cover the
bucket and centre-cropped, so the aspect ratio is preserved up to the crop of a few pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_media(path: str | Path) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix in VIDEO_EXTENSIONS or suffix in IMAGE_EXTENSIONS


def bucket_size(height: int, width: int, max_area: int, multiple: int) -> tuple[int, int]:
    """Largest (h, w) with the source aspect ratio, h*w <= max_area, both divisible by `multiple`.

    Sources smaller than max_area are not upscaled (only rounded to the multiple).
    """
    scale = min(1.0, math.sqrt(max_area / (height * width)))
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    # Rounding may overshoot the area budget: shrink the side that rounded up most.
    while h * w > max_area and (h > multiple or w > multiple):
        if (h > multiple and h / height >= w / width) or w == multiple:
            h -= multiple
        else:
            w -= multiple
    return h, w


def valid_frame_count(frames: int, temporal_factor: int) -> int:
    """Largest 1 + k*temporal_factor <= frames (the causal VAE encodes frame 0 alone)."""
    return 1 + (frames - 1) // temporal_factor * temporal_factor if frames >= 1 else 0


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float  # frame rate of `frames` (the source rate for images: 0)
    start_sec: float
    source_size: tuple[int, int]  # (H, W) before resizing


def _resize_crop(image, height: int, width: int) -> np.ndarray:
    """Cover (height, width) keeping aspect ratio, then centre-crop. `image` is an av.VideoFrame."""
    scale = max(height / image.height, width / image.width)
    rh, rw = max(height, round(image.height * scale)), max(width, round(image.width * scale))
    rgb = image.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (rh - height) // 2, (rw - width) // 2
    return rgb[top:top + height, left:left + width]


def iter_video_clips(path: str | Path, fps: float, num_frames: int, max_area: int, multiple: int,
                     temporal_factor: int = 4, max_clips: int = 0) -> Iterator[Clip]:
    """Cut a video into consecutive non-overlapping clips of `num_frames` frames at `fps`.

    The tail shorter than a clip is kept if it still holds a valid (1 + k*temporal_factor)
    frame count and the video produced no full clip, so short videos are not lost.
    """
    import av  # lazy: PyAV loads FFmpeg's libraries (0.4 s); only reading or writing media needs it

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_h, src_w = stream.codec_context.height, stream.codec_context.width
        h, w = bucket_size(src_h, src_w, max_area, multiple)
        buffer: list[np.ndarray] = []
        emitted, next_time, start, prev = 0, 0.0, 0.0, None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            # Emit the latest decoded frame at or before each target time we have passed.
            while prev is not None and next_time < t - 1e-6:
                buffer.append(_resize_crop(prev, h, w))
                next_time += 1.0 / fps
                if len(buffer) == num_frames:
                    yield Clip(np.stack(buffer), fps, start, (src_h, src_w))
                    buffer, emitted, start = [], emitted + 1, next_time
                    if max_clips and emitted >= max_clips:
                        return
            prev = frame
        if prev is not None and next_time <= float(prev.pts * stream.time_base) + 1e-6:
            buffer.append(_resize_crop(prev, h, w))
        keep = valid_frame_count(len(buffer), temporal_factor)
        if emitted == 0 and keep > 0:
            yield Clip(np.stack(buffer[:keep]), fps, start, (src_h, src_w))


def read_image(path: str | Path, max_area: int, multiple: int) -> Clip:
    """An image is a one-frame clip."""
    import av  # lazy: PyAV loads FFmpeg's libraries (0.4 s); only reading or writing media needs it

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    frame = av.VideoFrame.from_ndarray(np.asarray(rgb), format="rgb24")
    h, w = bucket_size(frame.height, frame.width, max_area, multiple)
    return Clip(_resize_crop(frame, h, w)[None], 0.0, 0.0, (frame.height, frame.width))


def iter_clips(path: str | Path, fps: float, num_frames: int, max_area: int, multiple: int,
               temporal_factor: int = 4, max_clips: int = 0) -> Iterator[Clip]:
    if is_image(path):
        yield read_image(path, max_area, multiple)
    else:
        yield from iter_video_clips(path, fps, num_frames, max_area, multiple, temporal_factor, max_clips)


def clip_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1], the VAE's input convention."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write uint8 (T, H, W, 3) as H.264 mp4 (or a .png for one frame / .gif by suffix)."""
    import av  # lazy: PyAV loads FFmpeg's libraries (0.4 s); only reading or writing media needs it

    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        Image.fromarray(frames[0]).save(path)
        return
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=max(1, round(fps)))
        # yuv420p needs even sizes; pad by edge replication if a bucket is odd.
        h, w = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            f = np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), mode="edge")
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
