"""UMT5 prompt encoder: equals transformers' UMT5EncoderModel run the way Wan runs it; padding is zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamgen.model.text import TextEncoder
from streamgen.model.umt5 import UMT5TokenEncoder

transformers = pytest.importorskip("transformers", reason="transformers runs the UMT5 encoder")
from tests.model import wan_tiny  # noqa: E402

MAX_TOKENS = 24
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("umt5")
    wan_tiny.make_umt5().save_pretrained(str(root / "text_encoder"))
    wan_tiny.make_tokenizer(root / "tokenizer")
    return root


def _wan_reference(root: Path, prompt: str) -> torch.Tensor:
    """Wan's recipe with transformers directly: pad to max length, mask, zero the padding rows."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = transformers.UMT5EncoderModel.from_pretrained(str(root / "text_encoder")).eval()
    ids = tokenizer([prompt], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        states = model(ids.input_ids, ids.attention_mask).last_hidden_state  # [1, L, d]
    return states * ids.attention_mask[..., None]


def test_embeddings_equal_transformers_wan_recipe(umt5_dir: Path) -> None:
    encoder = UMT5TokenEncoder(umt5_dir / "text_encoder", umt5_dir / "tokenizer")
    assert encoder.dim == wan_tiny.TEXT_DIM
    text = TextEncoder(MAX_TOKENS, token_encoder=encoder)
    prompts = ["a blue mug on a wooden desk", "a white box"]
    emb, lengths = text.encode(prompts)
    assert emb.shape == (2, MAX_TOKENS, wan_tiny.TEXT_DIM)
    for i, prompt in enumerate(prompts):
        ref = _wan_reference(umt5_dir, prompt)[0]
        assert int(lengths[i]) == int((ref.abs().sum(-1) > 0).sum())
        assert torch.equal(emb[i, lengths[i]:], torch.zeros_like(emb[i, lengths[i]:]))  # exact zero padding
        assert (emb[i] - ref).abs().max() <= 1e-5
    assert int(lengths[1]) < int(lengths[0])  # different lengths, each padded to MAX_TOKENS


def test_bfloat16_encoder_is_close(umt5_dir: Path) -> None:
    fp32 = UMT5TokenEncoder(umt5_dir / "text_encoder", umt5_dir / "tokenizer").encode_one("a white box", MAX_TOKENS)
    bf16 = UMT5TokenEncoder(umt5_dir / "text_encoder", umt5_dir / "tokenizer",
                            dtype=torch.bfloat16).encode_one("a white box", MAX_TOKENS)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert (bf16 - fp32).abs().max() <= 0.1 * fp32.abs().max()


def test_bad_directories(umt5_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config.json: missing"):
        UMT5TokenEncoder(tmp_path, umt5_dir / "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer directory"):
        UMT5TokenEncoder(umt5_dir / "text_encoder", tmp_path / "nope")
    with pytest.raises(ValueError, match=r"float32 or bfloat16"):
        UMT5TokenEncoder(umt5_dir / "text_encoder", umt5_dir / "tokenizer", dtype=torch.float16)
    broken = tmp_path / "text_encoder"
    broken.mkdir()
    (broken / "config.json").write_text((umt5_dir / "text_encoder" / "config.json").read_text())
    data = (umt5_dir / "text_encoder" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    encoder = UMT5TokenEncoder(broken, umt5_dir / "tokenizer")
    with pytest.raises(ValueError, match=r"cannot load the UMT5 encoder"):
        encoder.load()
    assert not encoder.is_loaded


def test_missing_or_extra_weights_are_refused(umt5_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "text_encoder"
    broken.mkdir()
    (broken / "config.json").write_text((umt5_dir / "text_encoder" / "config.json").read_text())
    state = load_file(str(umt5_dir / "text_encoder" / "model.safetensors"))
    state.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    encoder = UMT5TokenEncoder(broken, umt5_dir / "tokenizer")
    with pytest.raises(ValueError, match=r"missing keys \['encoder.block.1.layer.1.DenseReluDense.wo.weight'\].*"
                                         r"unexpected keys \['extra.weight'\]"):
        encoder.load()
    assert not encoder.is_loaded

