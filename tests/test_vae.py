"""Causal video VAE: shapes for images and videos, causality, save/load, diffusers adapters."""
import pytest
import torch

from megasora.models.vae import (
    VAEArch,
    VideoVAE,
    latent_shape,
    latents_to_pixels,
    load_vae,
    pixels_to_latents,
    save_vae,
)

TINY = VAEArch(latent_channels=4, base_channels=8, channel_mult=(1, 1, 2, 2), norm_groups=4,
               scaling_factor=0.5, shift_factor=0.1)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE(TINY).eval()


@pytest.mark.parametrize("frames,height,width", [(1, 16, 24), (1, 40, 8), (5, 32, 16), (9, 16, 16), (13, 8, 24)])
def test_encode_decode_shapes(vae, frames, height, width):
    x = torch.rand(2, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (2, 4, *latent_shape(frames, height, width, vae))
        assert mean.shape[2] == 1 + (frames - 1) // 4 and mean.shape[3:] == (height // 8, width // 8)
        assert vae.decode(mean).shape == x.shape
        z = pixels_to_latents(vae, x)
        assert torch.allclose(z, (mean - 0.1) * 0.5)
        out = latents_to_pixels(vae, z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_bad_shapes_are_rejected(vae):
    with pytest.raises(ValueError, match="1\\+4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))


def test_encoder_is_causal(vae):
    """Latent frame k sees pixel frames 0..4k only; an image encodes like the first frame of a video."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, 13, 16, 16)
    with torch.no_grad():
        base = vae.encode(x)[0]
        for k in range(3):
            y = x.clone()
            y[:, :, 4 * k + 1:] = torch.randn_like(y[:, :, 4 * k + 1:])
            changed = vae.encode(y)[0]
            assert torch.equal(changed[:, :, :k + 1], base[:, :, :k + 1])
            assert not torch.allclose(changed[:, :, k + 1:], base[:, :, k + 1:])
        image = vae.encode(x[:, :, :1])[0]
    assert torch.allclose(image[:, :, 0], base[:, :, 0], atol=1e-6)


def test_decoder_is_causal(vae):
    torch.manual_seed(2)
    z = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        base = vae.decode(z)
        z2 = z.clone()
        z2[:, :, 2] += 1.0
        out = vae.decode(z2)
    assert torch.equal(out[:, :, :5], base[:, :, :5])  # pixel frames of latents 0, 1
    assert not torch.allclose(out[:, :, 5:], base[:, :, 5:])


def test_kl_and_reconstruction_gradients_flow(vae):
    from megasora.models.vae import kl_divergence

    model = VideoVAE(TINY)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    recon, mean, logvar = model(x, generator=torch.Generator().manual_seed(0))
    loss = (recon - x).abs().mean() + 1e-3 * kl_divergence(mean, logvar)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_load_round_trip(vae, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_vae(vae, str(path))
    loaded = load_vae(str(path))
    assert loaded.arch == vae.arch
    x = torch.rand(1, 3, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(pixels_to_latents(loaded, x), pixels_to_latents(vae, x))
    with pytest.raises(FileNotFoundError):
        load_vae(str(tmp_path / "missing.safetensors"))


def _save_tiny_diffusers(kind: str, path):
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    torch.manual_seed(0)
    if kind == "cogvideox":
        model = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                                       norm_num_groups=4, scaling_factor=0.7)
    else:
        model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 1.0])
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_diffusers_vae_adapter(kind, tmp_path):
    reference = _save_tiny_diffusers(kind, tmp_path / kind).eval()
    vae = load_vae(str(tmp_path / kind))
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (4, 4, 8)
    x = torch.rand(1, 3, 9, 32, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == (1, 4, 3, 4, 2)
        assert torch.allclose(mean, reference.encode(x).latent_dist.mean, atol=1e-5)
        z = pixels_to_latents(vae, x)
        if kind == "wan":  # per-channel (z - mean) / std
            expect = (mean - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)) / \
                torch.tensor([2.0, 1.0, 0.5, 1.0]).view(1, 4, 1, 1, 1)
        else:
            expect = mean * 0.7
        assert torch.allclose(z, expect, atol=1e-6)
        assert latents_to_pixels(vae, z).shape == x.shape


def test_diffusers_dir_of_other_class_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="supported"):
        load_vae(str(tmp_path))


def test_decode_latents_to_viewable_files(vae, tmp_path):
    import av

    from megasora.data.decode import decode_to_files

    z = torch.randn(2, 4, 3, 2, 4)
    paths = decode_to_files(vae, z, tmp_path / "samples", fps=8)
    assert [p.name for p in paths] == ["sample_000.mp4", "sample_001.mp4"]
    with av.open(str(paths[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (16, 32, 3)
    (image,) = decode_to_files(vae, z[:1, :, :1], tmp_path / "one.mp4")
    assert image.suffix == ".png" and image.is_file()
