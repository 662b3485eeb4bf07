"""The engine on a device (cpu always, cuda where available): every tensor of its state lives there,
and a seed gives the same video on every call (noise is drawn on the CPU and moved)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamgen.engine.request import GenerationRequest
from tests.conftest import make_tiny_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensors(obj: object, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from ``obj`` through dataclass fields, dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors(v, f"{path}[{k!r}]")]
    if isinstance(obj, list | tuple):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{path}[{i}]")]
    if hasattr(obj, "__dataclass_fields__") or hasattr(obj, "__dict__"):
        fields = getattr(obj, "__dataclass_fields__", None) or vars(obj)
        return [t for name in fields for t in _tensors(getattr(obj, name, None), f"{path}.{name}")]
    return []


def test_engine_state_stays_on_its_device(device: torch.device) -> None:
    engine = make_tiny_engine(device=device)
    image = np.full((engine.preset.video.height, engine.preset.video.width, 3), 90, np.uint8)
    engine.add_request(GenerationRequest("a red mug", seed=3, num_frames=96), "plain")
    engine.add_request(GenerationRequest("a blue can", seed=4, num_frames=96, start_image=image), "image")
    for _ in range(12):  # a few chunks, both sessions batched
        engine.step()
    engine.update_prompt("plain", "a green box")
    for _ in range(6):  # the re-cache and one more chunk
        engine.step()
    found = []
    for sid, session in engine.sessions.items():
        assert session.tensors is not None and session.tensors.resident, sid  # frames are in the window
        # The generator is the one CPU object by design: noise is drawn on the CPU, then moved.
        assert session.tensors.generator.device.type == "cpu"
        found += [(f"{sid}{p}", t) for p, t in _tensors(session.tensors)]
    found += [("pool.k_cache", engine.kv.pool.k_cache), ("pool.v_cache", engine.kv.pool.v_cache)]
    found += [(f"model.{n}", p) for n, p in engine.model.named_parameters()]
    found += [(f"model.{n}", b) for n, b in engine.model.named_buffers()]
    found += [(f"vae.{n}", p) for n, p in engine.vae.named_parameters()]
    found += [(f"vae.{n}", b) for n, b in engine.vae.named_buffers()]
    wrong = [(p, str(t.device)) for p, t in found if t.device != device]  # the index too: cuda:1 is not cuda:0
    assert len(found) > 50 and wrong == []


def test_a_seed_gives_the_same_video_on_every_call(device: torch.device) -> None:
    videos = []
    for _ in range(2):
        engine = make_tiny_engine(device=device)
        sid = engine.add_request(GenerationRequest("a red mug", seed=11, num_frames=24))
        videos.append(np.concatenate([c.frames for c in engine.run_until_done()[sid]]))
    assert videos[0].shape[0] == 24 and np.array_equal(videos[0], videos[1])


def test_the_offline_generator_keeps_every_tensor_on_the_models_device() -> None:
    """On PyTorch's ``meta`` device (shapes, no data) any CPU tensor mixed into a forward is an error,
    so this finds a tensor left behind on the CPU without a GPU."""
    from streamgen.config import get_preset
    from streamgen.generate import generate_latents
    from streamgen.model.transformer import CausalWanTransformer

    preset = get_preset("test")
    model = CausalWanTransformer(preset.model).to("meta")
    context = model.encode_text(torch.zeros(1, preset.model.text_max_tokens, preset.model.text_dim, device="meta"))
    chunks = list(generate_latents(model, context, preset, 6, torch.Generator().manual_seed(0)))
    assert [c.device.type for c in chunks] == ["meta", "meta"] and chunks[0].shape[2] == 3
