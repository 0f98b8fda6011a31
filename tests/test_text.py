"""Text encoder: bundled MiniLM, T5/UMT5 encoder-only from a local path, caching."""
import pytest
import torch

from megasora.models.text import TextEncoder, default_text_encoder_path


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(max_length=12)


def test_minilm_embeddings_and_mask(minilm):
    emb, mask = minilm.encode(["a red car drives", "bunny", ""])
    assert emb.shape == (3, 12, 384) and emb.dtype == torch.float32 and minilm.dim == 384
    assert mask.dtype == torch.bool and mask.sum(1).tolist()[1] < mask.sum(1).tolist()[0]
    assert torch.all(emb[~mask] == 0)  # padded tokens carry nothing
    assert not torch.allclose(emb[0, 1], emb[1, 1])


def test_cache_is_exact_and_bounded():
    enc = TextEncoder(max_length=12, cache_size=2)
    first, _ = enc.encode(["one", "two"])
    again, _ = enc.encode(["two", "three", "one"])
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    assert len(enc._cache) == 2
    uncached = TextEncoder(max_length=12, cache_size=0)
    # Duplicates are encoded once, in a batch like the first call's: BERT's numerics depend on the
    # batch it runs in (~3e-6 between batch sizes 1 and 2), so exactness is only promised per batch.
    repeated = uncached.encode(["one", "two", "two"])[0]
    assert torch.equal(repeated[1], first[1]) and torch.equal(repeated[2], first[1])


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_t5_family_loads_encoder_only(kind, tmp_path):
    from transformers import (
        AutoTokenizer,
        T5Config,
        T5ForConditionalGeneration,
        UMT5Config,
        UMT5ForConditionalGeneration,
    )

    config_cls, model_cls = (T5Config, T5ForConditionalGeneration) if kind == "t5" else \
        (UMT5Config, UMT5ForConditionalGeneration)
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    torch.manual_seed(0)
    full = model_cls(config_cls(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, decoder_start_token_id=0))
    full.eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = TextEncoder(str(tmp_path), max_length=8)
    assert "EncoderModel" in type(enc.model).__name__ and enc.dim == 32
    emb, mask = enc.encode(["hello world"])
    ids = enc.tokenizer(["hello world"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ref = full.encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    assert torch.allclose(emb[mask], ref[0][mask[0]], atol=1e-5)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text.path"):
        TextEncoder(str(tmp_path / "nope"))
