"""Tiny Wan2.1 parts built in tests (no downloads): UMT5 + tokenizer, AutoencoderKLWan, WanTransformer3DModel.

``save_diffusers_dir`` writes them in the diffusers Wan2.1 T2V layout (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``model_index.json``), sized for the ``test`` preset's video
(32x32 pixels -> 4x4 latents, 4 tokens per latent frame).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32  # the tiny UMT5's d_model, hence the tiny transformer's text_dim
SENTENCES = [
    "a glossy red bottle turning on a white table",
    "a blue mug on a wooden desk",
    "a green can rotating slowly under soft light",
    "a white box with a black logo",
]


def make_tokenizer(directory: Path) -> None:
    """A Unigram tokenizer trained on a few sentences, saved as a fast tokenizer with T5's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


def make_umt5(vocab_size: int = 64, d_model: int = TEXT_DIM) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(1)
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(config).eval()


def make_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 2.0]).eval()
    return vae


def make_transformer(text_dim: int = TEXT_DIM) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(3)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=2).eval()
    with torch.no_grad():  # perturb so no term (zero-initialised head included) is trivially zero
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def save_diffusers_dir(root: Path) -> Path:
    """Write a tiny Wan2.1 T2V diffusers directory at ``root`` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    make_transformer().save_pretrained(str(root / "transformer"))
    make_vae().save_pretrained(str(root / "vae"))
    make_umt5().save_pretrained(str(root / "text_encoder"))
    make_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}))
    return root


_DIFFUSERS_TO_WAN = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.to_out.0.", ".self_attn.o."), (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."), (".attn2.to_", ".cross_attn."),
    (".attn1.norm_", ".self_attn.norm_"), (".attn2.norm_", ".cross_attn.norm_"),
    (".norm2.", ".norm3."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    ("proj_out.", "head.head."),
]


def to_wan_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> Wan-original names (the inverse of ``weights.convert_wan_original``), test-side."""
    out = {}
    for key, value in state.items():
        if ".norm_added_q." in key:
            continue
        name = key
        if name.endswith(".scale_shift_table") and name.startswith("blocks."):
            name = name.replace(".scale_shift_table", ".modulation")
        elif name == "scale_shift_table":
            name = "head.modulation"
        for a, b in _DIFFUSERS_TO_WAN:
            if name.startswith(a) or (a.startswith(".") and a in name):
                name = name.replace(a, b, 1)
                break
        out[name] = value
    return out
