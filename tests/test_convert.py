"""``streamgen convert`` -> model directory -> ``serve --model`` / ``generate --model`` / Pipeline, on tiny Wan parts.

A tiny UMT5 + tokenizer + AutoencoderKLWan + WanTransformer3DModel are saved as a diffusers Wan2.1
directory in the test (no downloads); a fake Self-Forcing ``.pt`` holds the same transformer in
Wan-original names. Bad input must be one line naming the file, exit 2, and never a partial load.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from streamgen import cli
from streamgen.api.v1 import pb, pb_grpc
from streamgen.engine.engine import EngineConfig
from streamgen.engine.factory import ModelSource, build_engine
from streamgen.model.weights import load_transformer
from streamgen.model_dir import read_model_dir
from streamgen.pipeline import Pipeline
from tests.server.harness import ServerHarness

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev/wan extra) builds the tiny Wan parts")
from tests.model import wan_tiny  # noqa: E402  (after the importorskip that it needs)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a glossy red bottle turning on a white table"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def wan_dir(work: Path) -> Path:
    return wan_tiny.save_diffusers_dir(work / "wan-tiny-diffusers")


@pytest.fixture(scope="module")
def converted(wan_dir: Path, work: Path) -> Path:
    assert cli.main(["convert", str(wan_dir), "--out", str(work / "model"), "--preset", "test"]) == 0
    return work / "model"


@pytest.fixture(scope="module")
def sf_checkpoint(wan_dir: Path, work: Path) -> Path:
    """A fake Self-Forcing checkpoint: generator_ema = the tiny transformer, generator = a perturbed copy."""
    from safetensors.torch import load_file

    state = load_file(str(wan_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    wan_names = wan_tiny.to_wan_original(state)
    ema = {f"model.{k}": v for k, v in wan_names.items()}
    raw = {k: v + 0.5 for k, v in ema.items()}
    path = work / "self_forcing_dmd.pt"
    torch.save({"generator": raw, "generator_ema": ema}, path)
    return path


def _serve_and_stream(model_dir: Path, num_frames: int) -> np.ndarray:
    """What `streamgen serve --model DIR` builds, behind the test server; one RAW stream's frames."""
    engine, weights = build_engine(ModelSource(preset="default", model_dir=model_dir, dtype="float32"),
                                   EngineConfig(kv_memory_bytes=2**22, max_frames=96, unbounded_max_frames=96))
    assert "vae=wan text=umt5" in weights
    with ServerHarness(engine) as server, grpc.insecure_channel(server.address) as channel:
        start = pb.StartRequest(prompt=PROMPT, seed=3, num_frames=num_frames, encoding=pb.ENCODING_RAW_RGB)
        responses = list(pb_grpc.StreamGenStub(channel).Generate(iter([pb.GenerateRequest(start=start)]),
                                                                 timeout=120))
    assert responses[-1].ended.reason == pb.StreamEnded.REASON_COMPLETED
    payload = b"".join(r.chunk.payload for r in responses if r.WhichOneof("response") == "chunk")
    return np.frombuffer(payload, np.uint8).reshape(-1, 32, 32, 3)


def test_diffusers_dir_converts_and_serves_requested_frames(converted: Path) -> None:
    md = read_model_dir(converted)
    assert (md.vae_kind, md.text_kind, md.text_dim) == ("wan", "umt5", wan_tiny.TEXT_DIM)
    assert md.source["kind"] == "diffusers" and len(md.source["sha256"]) == 64
    # 14 frames: Wan's 1 + 4k layout needs 5 latent frames (two chunks), the last chunk is trimmed.
    frames = _serve_and_stream(converted, 14)
    assert frames.shape == (14, 32, 32, 3) and frames.std() > 1


@pytest.mark.slow  # ~30 s of process start-up; the in-process test above covers the same engine build
def test_streamgen_serve_model_subprocess(converted: Path) -> None:
    """The real command: `streamgen serve --model DIR`, a RAW stream of the requested frames, SIGTERM -> exit 0."""
    import signal
    import subprocess
    import sys

    from tests.server.harness import ServeLog

    server = subprocess.Popen([sys.executable, "-m", "streamgen.cli", "serve", "--model", str(converted), "--port",
                               "0", "--metrics-port", "-1", "--dtype", "float32", "--no-pace"],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log = ServeLog(server)
    try:
        serving = log.wait_serving(timeout_s=180)
        with grpc.insecure_channel(str(serving["address"])) as channel:
            start = pb.StartRequest(prompt=PROMPT, seed=3, num_frames=14, encoding=pb.ENCODING_RAW_RGB)
            responses = list(pb_grpc.StreamGenStub(channel).Generate(iter([pb.GenerateRequest(start=start)]),
                                                                     timeout=120))
        assert responses[0].started.preset == "model" and responses[-1].ended.frames_sent == 14
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        log.join()


def test_converted_transformer_equals_diffusers(converted: Path) -> None:
    ref = wan_tiny.make_transformer()
    ours = load_transformer(converted / "transformer.safetensors")
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([321.0])
    text = torch.randn(1, 16, wan_tiny.TEXT_DIM)
    with torch.no_grad():
        diff = (ref(x, t, text, return_dict=False)[0] - ours(x, t, ours.encode_text(text))).abs().max()
    assert float(diff) <= 1e-4


def test_self_forcing_checkpoint_converts_ema_or_raw_and_serves(sf_checkpoint: Path, wan_dir: Path, work: Path,
                                                                converted: Path) -> None:
    out = work / "sf-model"
    assert cli.main(["convert", str(sf_checkpoint), "--base", str(wan_dir), "--out", str(out),
                     "--preset", "test", "--weights", "ema"]) == 0
    md = read_model_dir(out)
    assert md.source["kind"] == "self-forcing" and md.source["weights"] == "ema"
    ema = load_transformer(out / "transformer.safetensors").state_dict()
    same = load_transformer(converted / "transformer.safetensors").state_dict()
    assert all(torch.equal(ema[k], same[k]) for k in same)  # generator_ema is the diffusers model's weights
    assert cli.main(["convert", str(sf_checkpoint), "--base", str(wan_dir), "--out", str(work / "sf-raw"),
                     "--preset", "test", "--weights", "raw"]) == 0
    raw = load_transformer(work / "sf-raw" / "transformer.safetensors").state_dict()
    assert torch.allclose(raw["proj_out.weight"], ema["proj_out.weight"] + 0.5)
    frames = _serve_and_stream(out, 9)
    assert frames.shape == (9, 32, 32, 3)


def test_pipeline_equals_generate_cli(converted: Path, work: Path) -> None:
    out = work / "gen.npy"
    assert cli.main(["generate", "--model", str(converted), "--prompt", PROMPT, "--num-frames", "10",
                     "--seed", "4", "--out", str(out), "--dtype", "float32", "--no-progress"]) == 0
    pipe = Pipeline.from_pretrained(converted, dtype="float32")
    frames = pipe(PROMPT, num_frames=10, seed=4)
    assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, np.load(out))
    assert not np.array_equal(frames, pipe(PROMPT, num_frames=10, seed=5))
    images = pipe(PROMPT, num_frames=10, seed=4, output_type="pil")
    assert len(images) == 10 and np.array_equal(np.stack([np.asarray(i) for i in images]), frames)


def test_pipeline_stream_yields_chunks_and_switches_prompt(converted: Path) -> None:
    pipe = Pipeline.from_pretrained(converted, dtype="float32")
    stream = pipe.stream(PROMPT, num_frames=21, seed=4)
    # The first chunk (3 latent frames -> 1 + 4 + 4 pixel frames) comes in two parts: its first latent frame's
    # one frame as soon as it is denoised, the other 8 with the chunk's cache write.
    head = next(stream)
    assert head.shape == (1, 32, 32, 3)
    stream.set_prompt("a blue mug on a wooden desk")  # between the parts: from the next chunk on
    first = np.concatenate([head, next(stream)])
    assert first.shape == (9, 32, 32, 3)
    rest = list(stream)
    assert sum(len(c) for c in rest) == 12 and stream.finish_reason == "completed"
    # The stream runs the serving engine; before the switch it matches the offline generator.
    offline = pipe(PROMPT, num_frames=9, seed=4)
    assert np.abs(first.astype(int) - offline.astype(int)).max() <= 2
    # The switch changes what comes after it: the same stream without it gives other frames.
    unswitched = np.concatenate(list(pipe.stream(PROMPT, num_frames=21, seed=4)))
    assert np.abs(unswitched[:9].astype(int) - first.astype(int)).max() <= 2
    assert np.abs(unswitched[9:].astype(int) - np.concatenate(rest).astype(int)).max() > 2


@pytest.mark.parametrize(("chunks", "kinds"),
                         [(1, ["denoise"] * 4), (2, ["denoise"] * 4 + ["commit"] + ["denoise"] * 4)])
def test_warm_up_on_the_wan_vae_runs_exactly_its_chunks(converted: Path, chunks: int, kinds: list[str]) -> None:
    """Wan's VAE makes 1 + 4k frames of k + 1 latent frames: the warm-up asks for frames that fill exactly
    ``chunks`` chunks, not one more (a chunk of one latent frame would be a shape of its own to warm up)."""
    from streamgen.engine.engine import Engine
    from streamgen.model_dir import load_model_dir

    parts = load_model_dir(converted)
    engine = Engine(parts.preset, parts.transformer, parts.vae, parts.text, EngineConfig(kv_memory_bytes=2**22),
                    dtype=torch.float32)
    ran: list[tuple[str, int]] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch: ran.append((batch.kind.value, batch.num_frames)) or execute(batch)
    assert engine.warm_up(chunks) > 0
    assert [kind for kind, _ in ran] == kinds
    assert {frames for _, frames in ran} == {parts.preset.sampler.chunk_frames}


def test_staggered_streams_on_the_wan_vae_equal_alone(converted: Path) -> None:
    """One stream's first chunk commits in the same batch as another's later chunk: each decodes
    as it would alone (the Wan VAE decodes streams one by one inside the batched step)."""
    from streamgen.engine.engine import Engine
    from streamgen.engine.request import GenerationRequest
    from streamgen.model_dir import load_model_dir

    def engine() -> Engine:
        parts = load_model_dir(converted)
        return Engine(parts.preset, parts.transformer, parts.vae, parts.text,
                      EngineConfig(kv_memory_bytes=2**22), dtype=torch.float32)

    alone = engine()
    sid = alone.add_request(GenerationRequest(PROMPT, seed=1, num_frames=21))
    reference = np.concatenate([c.frames for c in alone.run_until_done()[sid]])
    both = engine()
    both.add_request(GenerationRequest("a white box", seed=2, num_frames=21), "early")
    early = [c for _ in range(5) for c in both.step()]  # "early" finishes its first chunk (4 steps + commit)
    both.add_request(GenerationRequest(PROMPT, seed=1, num_frames=21), "late")
    outputs = both.run_until_done()
    outputs["early"] = early + outputs["early"]
    frames = np.concatenate([c.frames for c in outputs["late"]])
    assert frames.shape == reference.shape == (21, 32, 32, 3)
    assert np.abs(frames.astype(int) - reference.astype(int)).max() <= 1
    assert sum(len(c.frames) for c in outputs["early"]) == 21


def test_image_start_on_the_wan_vae(converted: Path) -> None:
    """A start image is Wan-encoded into latent frame 0 (one pixel frame); the stream still gives N frames."""
    from streamgen.engine.engine import Engine
    from streamgen.engine.request import GenerationRequest
    from streamgen.model_dir import load_model_dir

    parts = load_model_dir(converted)
    engine = Engine(parts.preset, parts.transformer, parts.vae, parts.text, EngineConfig(kv_memory_bytes=2**22),
                    dtype=torch.float32)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sid = engine.add_request(GenerationRequest(PROMPT, seed=1, num_frames=14, start_image=image))
    chunks = engine.run_until_done()[sid]
    assert sum(len(c.frames) for c in chunks) == 14 and len(chunks[0].frames) == 1
    assert chunks[-1].finish_reason == "completed"


def test_info_prints_model_dir_and_memory_plan(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--model", str(converted), "--kv-memory-mb", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_dir"]["text_encoder"]["kind"] == "umt5"
    plan = info["memory_plan"]
    assert plan["kv_bytes_per_frame"] == 4 * 2 * 2 * 32 * 2  # tokens x layers x (K, V) x width x bf16
    assert plan["kv_bytes_per_stream"] is None  # the test preset keeps every frame (no window)


def test_info_wan_preset_memory_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--preset", "wan-1.3b", "--kv-memory-mb", "40000", "--device-memory-gb", "80"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["kv_bytes_per_frame"] == 30 * 2 * 1560 * 1536 * 2
    assert plan["reserved_frames"] == 15  # 3 sink + 9 recent + a 3-frame chunk in flight
    assert 2.8e9 < plan["transformer_bytes"] < 2.9e9  # 1.42 B parameters in bf16
    assert plan["streams_in_kv_memory"] == 40000 * 2**20 // plan["kv_bytes_per_stream"]
    assert 10 <= plan["streams_on_device"] <= 20
    # docs/serving.md "Memory plan" states these figures: they must be what info prints.
    docs = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    per_stream = (plan["kv_bytes_per_stream"] + plan["text_context_bytes_per_stream"]
                  + plan["activation_bytes_per_chunk"])
    text_on_cpu = int((plan["device_memory_bytes"] - plan["transformer_bytes"] - plan["vae_bytes"]) // per_stream)
    for stated in (f"| KV per stream | {plan['kv_bytes_per_stream'] / 1e9:.2f} GB |",
                   f"Each stream costs {per_stream / 1e9:.2f} GB",
                   f"holds **{plan['streams_on_device']} streams**", f"({text_on_cpu} with the text",
                   f"says {plan['streams_in_kv_memory']} streams' caches fit in 40000 MiB"):
        assert stated in docs, stated


# ------------------------------------------------------------------------------------------------ bad input


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    capsys.readouterr()  # drop what the test's own setup printed
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # The error is the last line, alone (before it at most generate's "device: ..." / "dtype: ..." /
    # "attention: ..." notes; no traceback).
    err = lines[-1]
    assert err.startswith(f"streamgen {argv[0]}: error: "), lines
    assert all(line.startswith(("device: ", "dtype: ", "attention: ")) for line in lines[:-1]), lines
    for needle in needles:
        assert needle in err, err
    return err


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("part", ["vae", "text_encoder", "tokenizer", "transformer", "model_index.json"])
def test_diffusers_dir_missing_a_part(wan_dir: Path, tmp_path: Path, part: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(wan_dir, tmp_path / "src")
    target = src / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    _fails(["convert", str(src), "--out", str(tmp_path / "out"), "--preset", "test"], capsys,
           str(target), "missing")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_model_dir_missing_a_part(converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(converted, tmp_path / "model")
    shutil.rmtree(model / "vae")
    for command in (["serve", "--model", str(model)],
                    ["generate", "--model", str(model), "--prompt", "x", "--num-frames", "4", "--out",
                     str(tmp_path / "x.npy")]):
        _fails(command, capsys, str(model / "vae"), "missing")


def test_truncated_safetensors(wan_dir: Path, converted: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(wan_dir, tmp_path / "src")
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails(["convert", str(src), "--out", str(tmp_path / "out"), "--preset", "test"], capsys,
           str(weights), "corrupt")
    model = _copy(converted, tmp_path / "model")
    weights = model / "transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails(["generate", "--model", str(model), "--prompt", "x", "--num-frames", "4", "--out",
            str(tmp_path / "x.npy")], capsys, str(weights), "corrupt")
    vae = _copy(converted, tmp_path / "model2") / "vae" / "diffusion_pytorch_model.safetensors"
    data = vae.read_bytes()
    vae.unlink()  # a hard link to the source's file: write a new file instead of truncating both
    vae.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Pipeline.from_pretrained(tmp_path / "model2")
    umt5 = next((_copy(converted, tmp_path / "model3") / "text_encoder").glob("*.safetensors"))
    data = umt5.read_bytes()
    umt5.unlink()
    umt5.write_bytes(data[:-100])
    _fails(["generate", "--model", str(tmp_path / "model3"), "--prompt", "x", "--num-frames", "4", "--out",
            str(tmp_path / "y.npy")], capsys, str(umt5), "cannot load the UMT5 encoder")


def test_checkpoint_with_wrong_keys(sf_checkpoint: Path, wan_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = torch.load(sf_checkpoint, weights_only=True)
    ema = dict(data["generator_ema"])
    ema.pop("model.blocks.1.cross_attn.v.bias")
    ema["model.blocks.0.ffn.0.weight"] = ema["model.blocks.0.ffn.0.weight"][:, :-1]
    bad = tmp_path / "missing.pt"
    torch.save({"generator_ema": ema}, bad)
    _fails(["convert", str(bad), "--base", str(wan_dir), "--out", str(tmp_path / "o1"), "--preset", "test"],
           capsys, str(bad), "blocks.1.attn2.to_v.bias")
    ema = dict(data["generator_ema"])
    ema["model.blocks.0.ffn.0.weight"] = ema["model.blocks.0.ffn.0.weight"][:, :-1]
    torch.save({"generator_ema": ema}, bad)
    _fails(["convert", str(bad), "--base", str(wan_dir), "--out", str(tmp_path / "o1"), "--preset", "test"],
           capsys, str(bad), "blocks.0.ffn.net.0.proj.weight", "shape")
    ema = dict(data["generator_ema"], **{"model.blocks.0.extra.weight": torch.zeros(1)})
    torch.save({"generator_ema": ema}, bad)
    _fails(["convert", str(bad), "--base", str(wan_dir), "--out", str(tmp_path / "o1"), "--preset", "test"],
           capsys, str(bad), "blocks.0.extra.weight")
    torch.save({"generator": data["generator"]}, bad)
    _fails(["convert", str(bad), "--base", str(wan_dir), "--out", str(tmp_path / "o1"), "--preset", "test"],
           capsys, str(bad), "generator_ema")
    assert not (tmp_path / "o1").exists()


class _NotAStateDict:
    pass


def test_pickle_that_is_not_a_state_dict(wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "object.pt"
    with open(path, "wb") as f:
        pickle.dump(_NotAStateDict(), f)  # weights_only refuses arbitrary classes: nothing is executed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning must not reach the user
        err = _fails(["convert", str(path), "--base", str(wan_dir), "--out", str(tmp_path / "o"), "--preset",
                      "test"], capsys, str(path), "not a loadable state-dict checkpoint", "more than tensors")
    assert "weights_only` set to `False`" not in err and "will likely succeed" not in err
    path.write_bytes(b"not a pickle at all" * 10)
    _fails(["convert", str(path), "--base", str(wan_dir), "--out", str(tmp_path / "o"), "--preset", "test"],
           capsys, str(path), "not a loadable state-dict checkpoint")
    torch.save([torch.zeros(2)], path)
    _fails(["convert", str(path), "--base", str(wan_dir), "--out", str(tmp_path / "o"), "--preset", "test"],
           capsys, str(path), "holds a list")
    assert not (tmp_path / "o").exists()


def test_text_encoder_of_wrong_width(wan_dir: Path, converted: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(wan_dir, tmp_path / "src")
    shutil.rmtree(src / "text_encoder")
    wan_tiny.make_umt5(d_model=48).save_pretrained(str(src / "text_encoder"))
    _fails(["convert", str(src), "--out", str(tmp_path / "out"), "--preset", "test"], capsys,
           str(src / "text_encoder" / "config.json"), "d_model=48", "text_dim 32")
    model = _copy(converted, tmp_path / "model")
    shutil.rmtree(model / "text_encoder")
    shutil.copytree(src / "text_encoder", model / "text_encoder")
    _fails(["serve", "--model", str(model)], capsys, "umt5 has width 48", "text_dim 32")


def test_model_flag_conflicts(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["serve", "--model", str(converted), "--random-init"], capsys, "--random-init")
    _fails(["info", "--model", str(converted), "--preset", "wan-1.3b"], capsys, "--preset")


def test_committed_default_model_is_a_model_directory() -> None:
    from streamgen import default_model
    from streamgen.model.text import HashTokenEncoder
    from streamgen.model_dir import load_model_dir

    md = read_model_dir(default_model.model_dir())
    student, vae = default_model.resolve("default", None, None, False)
    assert md.transformer.resolve() == student.resolve() and md.vae.resolve() == vae.resolve()
    assert (md.preset.name, md.vae_kind, md.text_kind) == ("default", "streamgen", "minilm")
    parts = load_model_dir(md, token_encoder=HashTokenEncoder())
    committed = load_transformer(student).state_dict()
    assert all(torch.equal(v, committed[k]) for k, v in parts.transformer.state_dict().items())


def test_preset_text_width_without_its_encoder_is_refused() -> None:
    # wan-1.3b conditions on 4096-d UMT5 states; MiniLM's 384-d ones must not reach it (refused before loading).
    with pytest.raises(ValueError, match="384-d embeddings but preset wan-1.3b expects text_dim 4096"):
        build_engine(ModelSource(preset="wan-1.3b", random_init=True, text_encoder="hash"), EngineConfig())
    from streamgen.config import get_preset
    from streamgen.model.text import HashTokenEncoder, TextEncoder

    preset = get_preset("test")
    text = TextEncoder(preset.model.text_max_tokens, token_encoder=HashTokenEncoder(8))
    assert cli.main(["generate", "--preset", "wan-1.3b", "--random-init", "--prompt", "x", "--num-frames", "1",
                     "--out", "x.npy"]) == 2
    with pytest.raises(ValueError, match="8-d embeddings but preset test expects text_dim 384"):
        Pipeline(preset, torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), text)

