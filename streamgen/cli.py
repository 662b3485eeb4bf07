"""Command line: ``streamgen serve | generate | info | convert``.

Each sub-command validates its arguments before doing any work and exits non-zero with a
one-line message on bad input (``ValueError`` -> exit 2). Heavy imports (torch, the text
encoder) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from streamgen import default_model
from streamgen.config import ATTENTION_CHOICES, PRESETS  # plain dataclasses: --help stays instant
from streamgen.device import DEVICE_HELP
from streamgen.precision import DTYPE_NAMES


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth reading."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
                 ) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, formatter_class=_DefaultsHelp)


def _add_preset(p: argparse._ActionsContainer) -> None:
    p.add_argument("--preset", default="default", help=f"model preset: {', '.join(PRESETS)}")


def _add_model(p: argparse._ActionsContainer, random_init_help: str) -> None:
    """The flags that choose the weights and how they run (``generate`` and ``serve`` alike)."""
    _add_preset(p)
    p.add_argument("--model", type=Path,
                   help="a streamgen model directory (model.json; see `streamgen convert`), instead of "
                        "--preset/--transformer/--vae; e.g. checkpoints/default")
    p.add_argument("--transformer", type=Path,
                   help="transformer checkpoint (.safetensors); default: the committed default model "
                        f"(checkpoints/{default_model.STUDENT_FILE}, or ${default_model.ENV_DIR})")
    p.add_argument("--vae", type=Path,
                   help=f"VAE checkpoint (.safetensors); default: checkpoints/{default_model.VAE_FILE}")
    p.add_argument("--random-init", action="store_true", help=random_init_help)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="auto",
                   help="transformer precision (and KV-cache dtype); auto = bfloat16 only where the CPU multiplies "
                        "it natively (AVX512-BF16/AMX) or on CUDA, else float32")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention backend; auto: gemm on a CPU with AVX512-BF16/AMX (bf16 attention as two GEMMs "
                        "around a softmax, PyTorch's SDPA for the rest), sdpa elsewhere")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: INT8 linear layers in the transformer blocks (CPU, float32); see docs/speed.md")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (faster chunks, but compiling takes ~100 s on 2 CPU "
                        "cores: `serve` compiles for one stream in its warm-up before SERVING, `generate` on its "
                        "first chunk); see docs/speed.md")
    p.add_argument("--linear", choices=["auto", "onednn", "aten"], default="auto",
                   help="kernel of the transformer's linear layers; auto: onednn on a CPU (weights reordered once "
                        "at load into oneDNN's layout, 1.3-3x faster GEMMs), aten (F.linear) elsewhere or with "
                        "--quantize/--compile; see docs/speed.md")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "generate", "generate a video offline (chunked, KV-cached) and write an MP4",
                     "Generate a video chunk by chunk with the causal student and its rolling KV cache, decode it "
                     "with the VAE as it is made, and write H.264 MP4. Prints a JSON summary.")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--num-frames", type=int, required=True, help="number of pixel frames to write (> 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same video)")
    p.add_argument("--out", type=Path, required=True,
                   help="output path: .mp4 (H.264) or .npy (the exact uint8 frames [F, H, W, 3])")
    _add_model(p, "use randomly initialised weights, seeded by --seed (no checkpoints; output is noise-like)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "serve", "serve the model over gRPC (health, reflection, Prometheus metrics)",
        "Serve real-time video generation over gRPC: a bidirectional Generate stream per video "
        "(protos/streamgen/v1/streamgen.proto), grpc.health.v1 health checking, server reflection "
        "and Prometheus metrics on HTTP. SIGTERM/SIGINT drain: health NOT_SERVING, new streams "
        "UNAVAILABLE, running streams end with REASON_SERVER_SHUTDOWN after --drain-timeout-s, "
        "exit 0. See docs/serving.md.")
    model = p.add_argument_group("model")
    _add_model(model, "serve randomly initialised weights (seed 0; the video is noise-like)")
    model.add_argument("--text-encoder", choices=["minilm", "hash"],
                       help="prompt encoder (default: the model directory's, else minilm); 'hash' is a model-free "
                            "stand-in for tests and load benchmarks only")
    net = p.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    net.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port, see the log)")
    net.add_argument("--metrics-port", type=int, default=9090,
                     help="Prometheus /metrics HTTP port on --host (0 = any free port, -1 = off)")
    net.add_argument("--token-file", type=Path,
                     help="file holding the bearer token clients must send ('authorization: Bearer <token>'); "
                          "default: env STREAMGEN_TOKEN; neither = no auth")
    net.add_argument("--tls-cert", type=Path, help="TLS certificate chain (PEM); with --tls-key enables TLS")
    net.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    net.add_argument("--max-message-bytes", type=int, default=8 * 2**20,
                     help="largest request message accepted (start image included); larger -> RESOURCE_EXHAUSTED")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-sessions", type=int, default=8, help="streams generating at once (one batch)")
    lim.add_argument("--max-waiting", type=int, default=16,
                     help="streams that may queue for admission; beyond -> RESOURCE_EXHAUSTED at once")
    lim.add_argument("--kv-memory-mb", type=float, default=512, help="KV-cache pool size in MiB")
    lim.add_argument("--max-frames", type=int, default=16 * 60 * 10,
                     help="most pixel frames per stream; unbounded streams end with REASON_LIMIT_REACHED there")
    lim.add_argument("--max-prompt-chars", type=int, default=500, help="longest prompt accepted")
    lim.add_argument("--max-queue-wait-s", type=float, default=30.0,
                     help="how long a stream may wait for KV-pool admission before RESOURCE_EXHAUSTED")
    lim.add_argument("--drain-timeout-s", type=float, default=20.0,
                     help="on SIGTERM, how long running streams may continue before REASON_SERVER_SHUTDOWN")
    lim.add_argument("--stall-timeout-s", type=float, default=60.0,
                     help="cancel a stream whose client has read nothing for this long")
    stream = p.add_argument_group("streaming")
    stream.add_argument("--pace", action=argparse.BooleanOptionalAction, default=True,
                        help="pace each stream to its playback clock (generate at most --max-lead-s ahead); "
                             "--no-pace generates as fast as possible")
    stream.add_argument("--max-lead-s", type=float, default=2.0, help="with --pace: seconds generation may lead")
    stream.add_argument("--max-buffered-chunks", type=int, default=4,
                        help="per-stream chunks between engine and network; a full buffer pauses that session")
    stream.add_argument("--keyframe-interval-s", type=float, default=2.0,
                        help="default H.264 keyframe interval in seconds of video (clients may override)")
    stream.add_argument("--warm-up-chunks", type=int, default=2,
                        help="chunks of a throwaway stream run before the server reports SERVING, so the first "
                             "client does not pay one-time costs (kernel packing, CUDA start-up, --compile's "
                             "compilation for one stream); 2 run every kind of forward; 0 = none")
    stream.add_argument("--jpeg-quality", type=int, default=90, help="default JPEG quality (clients may override)")
    stream.add_argument("--h264-crf", type=int, default=18, help="x264 constant rate factor (lower = better)")
    out = p.add_argument_group("logging")
    out.add_argument("--log-format", choices=["json", "text"], default="json",
                     help="structured log lines on stderr: JSON objects or key=value")
    out.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "info", "print a preset's or model directory's configuration and memory plan as JSON",
                     "Print a preset's model, VAE, cache, sampler and video configuration, plus derived sizes (model "
                     "width, latent grid, tokens per frame, pixel frames per chunk) and a memory plan computed on "
                     "the meta device (no weights loaded): weight bytes, KV bytes per stream at the preset's "
                     "window, activations per chunk, and how many streams fit. See docs/serving.md.")
    _add_preset(p)
    p.add_argument("--model", type=Path, help="a streamgen model directory (its preset and parts)")
    p.add_argument("--plan-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="serving precision the memory plan assumes (weights, KV, activations)")
    p.add_argument("--kv-memory-mb", type=float, help="KV pool size in MiB: how many streams' caches fit")
    p.add_argument("--device-memory-gb", type=float, default=80.0,
                   help="device memory in GB (10^9 bytes): how many streams fit beside the weights")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "convert", "turn a diffusers Wan2.1 directory or a Self-Forcing checkpoint into a model directory",
        "Convert (a) a diffusers Wan2.1 T2V directory (transformer/, vae/, text_encoder/, tokenizer/, "
        "model_index.json) or (b) a Self-Forcing / CausVid training checkpoint (.pt with generator and/or "
        "generator_ema, Wan-original key names; needs --base for the config, VAE and text encoder) into a "
        "streamgen model directory for `streamgen serve --model`. Strict: every key used once.")
    p.add_argument("source", type=Path, help="diffusers Wan2.1 T2V directory, or a training checkpoint (.pt)")
    p.add_argument("--out", type=Path, required=True, help="the model directory to create (must not exist)")
    p.add_argument("--base", type=Path,
                   help="for a .pt: a diffusers Wan2.1 T2V directory giving the transformer config, VAE and "
                        "text encoder (its transformer weights are not used)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="for a .pt: generator_ema (ema) or generator (raw)")
    p.add_argument("--preset", default="wan-1.3b",
                   help=f"preset giving video size, cache window and sampler: {', '.join(PRESETS)}")


def _package_version() -> str:
    """The installed distribution's version (from its metadata, i.e. pyproject.toml at build time)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamgen")
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description="Real-time autoregressive video generation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_convert(sub)
    return parser


def _check_model_flags(args: argparse.Namespace) -> None:
    """``--model DIR`` replaces the preset and checkpoint flags; mixing them is an error."""
    if args.model is None:
        return
    given = [flag for flag, on in (("--transformer", getattr(args, "transformer", None) is not None),
                                   ("--vae", getattr(args, "vae", None) is not None),
                                   ("--random-init", getattr(args, "random_init", False)),
                                   ("--preset", args.preset != "default")) if on]
    if given:
        raise ValueError(f"--model takes its preset and weights from {args.model / 'model.json'}; drop "
                         f"{', '.join(given)}")


def _resolve_device(args: argparse.Namespace) -> None:
    """``--device`` text -> ``args.device`` (a ``torch.device``), first thing in a command: CUDA asked for on a
    machine without it (or a bad index) is a ``ValueError`` -> exit 2 with one line, before anything loads."""
    from streamgen.device import resolve_device

    args.device = resolve_device(args.device)


def _check_speedups(args: argparse.Namespace) -> None:
    """``--quantize`` / ``--dtype`` / ``--linear`` combinations that cannot run fail here, before any weights load."""
    from streamgen.model.prepack import resolve_linear
    from streamgen.precision import resolve_dtype

    # Every --dtype runs on a CPU (forced bf16 warns later, when the model loads); bfloat16 on a GPU without it
    # fails here, as does --linear onednn on a GPU or with bf16 weights oneDNN cannot pack on this CPU.
    dtype = resolve_dtype(args.dtype, args.device).dtype
    resolve_linear(args.linear, args.device, dtype=dtype, quantize=args.quantize, compile=args.compile)
    if args.quantize == "none":
        return
    from streamgen.model.quantize import check_quantize

    check_quantize(args.quantize, args.device, dtype)


def cmd_info(args: argparse.Namespace) -> int:
    from streamgen.config import get_preset, to_dict

    _check_model_flags(args)
    if args.kv_memory_mb is not None and args.kv_memory_mb <= 0:
        raise ValueError(f"--kv-memory-mb must be > 0, got {args.kv_memory_mb}")
    if not args.device_memory_gb > 0:
        raise ValueError(f"--device-memory-gb must be > 0, got {args.device_memory_gb}")
    md = None
    if args.model is not None:
        from streamgen.model_dir import read_model_dir

        md = read_model_dir(args.model)
        preset = md.preset
    else:
        preset = get_preset(args.preset)
    info = to_dict(preset)
    info["derived"] = {"dim": preset.model.dim, "latent_height": preset.latent_height,
                       "latent_width": preset.latent_width, "tokens_per_frame": preset.tokens_per_frame,
                       "pixel_frames_per_chunk": preset.pixel_frames(preset.sampler.chunk_frames)}
    import torch

    from streamgen.memory_plan import plan

    memory = plan(preset, dtype=getattr(torch, args.plan_dtype),
                  text_kind=None if md is None else md.text_kind, vae_kind=None if md is None else md.vae_kind,
                  text_encoder_dir=None if md is None else md.text_encoder,
                  vae_dir=None if md is None or md.vae_kind != "wan" else md.vae,
                  kv_memory_bytes=None if args.kv_memory_mb is None else int(args.kv_memory_mb * 2**20),
                  device_memory_bytes=int(args.device_memory_gb * 1e9))
    if md is not None:
        info["model_dir"] = md.describe()
    info["memory_plan"] = memory.as_dict()
    print(json.dumps(info, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from streamgen.config import get_preset
    from streamgen.convert import convert

    get_preset(args.preset)
    out = convert(args.source, args.out, base=args.base, weights=args.weights, preset=args.preset)
    from streamgen.model_dir import read_model_dir

    md = read_model_dir(out)
    print(json.dumps({"out": str(out), "preset": md.preset.name, "source": md.source}))
    return 0


def _model_source(args: argparse.Namespace) -> object:
    """The model flags of ``serve`` / ``generate`` as a :class:`streamgen.engine.factory.ModelSource`."""
    from streamgen.engine.factory import ModelSource

    return ModelSource(preset=args.preset, transformer=args.transformer, vae=args.vae, random_init=args.random_init,
                       dtype=args.dtype, attention=args.attention, text_encoder=getattr(args, "text_encoder", None),
                       threads=args.threads, model_dir=args.model, quantize=args.quantize, compile=args.compile,
                       linear=args.linear, device=str(args.device))


def _print_choice(name: str, **fields: object) -> None:
    """``generate`` prints the choices made while loading (device, dtype and why) on stderr."""
    if name == "dtype":
        print(f"dtype: {fields['dtype']} ({fields['reason']})", file=sys.stderr)
    elif name == "attention":
        print(f"attention: {fields['backend']} ({fields['reason']})", file=sys.stderr)
    elif name == "linear":
        print(f"linear: {fields['kernel']} ({fields['reason']})", file=sys.stderr)
    else:
        print(f"{name}: " + " ".join(str(v) for v in fields.values()), file=sys.stderr)


def _build_pipeline(args: argparse.Namespace) -> object:
    """The Pipeline ``generate`` runs, over the model the engine factory loads (as ``serve`` does)."""
    from streamgen.engine.factory import load_model
    from streamgen.pipeline import Pipeline

    m = load_model(_model_source(args), _print_choice, init_seed=args.seed)  # type: ignore[arg-type]
    return Pipeline(m.preset, m.transformer, m.vae, m.text, dtype=m.dtype, device=m.device, description=m.weights)


def cmd_generate(args: argparse.Namespace) -> int:
    from streamgen.config import get_preset

    _resolve_device(args)
    _check_model_flags(args)
    _check_speedups(args)
    if args.model is None:
        get_preset(args.preset)
    if args.num_frames <= 0:
        raise ValueError(f"--num-frames must be > 0, got {args.num_frames}")
    if not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    if args.out.suffix.lower() not in (".mp4", ".npy"):
        raise ValueError(f"--out must end in .mp4 or .npy, got {args.out}")
    if args.model is None:
        args.transformer, args.vae = default_model.resolve(args.preset, args.transformer, args.vae, args.random_init)
    else:
        from streamgen.model_dir import read_model_dir

        read_model_dir(args.model)  # every part present, widths agree: fail before any loading

    import numpy as np
    from tqdm import tqdm

    from streamgen.video_io import Mp4Writer

    pipe = _build_pipeline(args)
    video = pipe.preset.video  # type: ignore[attr-defined]
    written = 0
    kept: list[np.ndarray] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        writer = (stack.enter_context(Mp4Writer(args.out, video.width, video.height, video.fps))
                  if args.out.suffix.lower() == ".mp4" else None)
        bar = stack.enter_context(tqdm(total=args.num_frames, unit="frame", desc="generate",
                                       disable=args.no_progress))
        for frames in pipe.iter_frames(args.prompt, num_frames=args.num_frames,  # type: ignore[attr-defined]
                                       seed=args.seed):
            if writer is not None:
                writer.write(frames)
            else:
                kept.append(frames)
            written += len(frames)
            bar.update(len(frames))
    if writer is None:
        np.save(args.out, np.concatenate(kept))
    print(json.dumps({"out": str(args.out), "frames": written, "width": video.width,
                      "height": video.height, "fps": video.fps}))
    return 0


def _read_token(token_file: Path | None) -> str | None:
    """The bearer token from --token-file, else env STREAMGEN_TOKEN, else None (never logged)."""
    import os

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get("STREAMGEN_TOKEN", "").strip() or None


def cmd_serve(args: argparse.Namespace) -> int:
    import math

    from streamgen.config import get_preset

    _resolve_device(args)  # args.device: a torch.device from here on
    _check_model_flags(args)
    _check_speedups(args)
    get_preset(args.preset)  # unknown names fail before anything loads
    for flag in ("tls_cert", "tls_key", "transformer", "vae"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path} is not a file")
    if args.kv_memory_mb <= 0:
        raise ValueError(f"--kv-memory-mb must be > 0, got {args.kv_memory_mb}")
    if args.warm_up_chunks < 0:
        raise ValueError(f"--warm-up-chunks must be >= 0 (0 = no warm-up), got {args.warm_up_chunks}")
    if args.pace and not (args.max_lead_s > 0):
        raise ValueError(f"--max-lead-s must be > 0, got {args.max_lead_s}")

    if args.model is not None:
        from streamgen.model_dir import read_model_dir

        read_model_dir(args.model)  # every part present, widths agree: fail before the server starts
    else:
        args.transformer, args.vae = default_model.resolve(args.preset, args.transformer, args.vae,
                                                           args.random_init)

    from streamgen.engine.engine import EngineConfig
    from streamgen.server.app import run
    from streamgen.server.config import ServerConfig

    source = _model_source(args)
    engine_config = EngineConfig(max_sessions=args.max_sessions, kv_memory_bytes=int(args.kv_memory_mb * 2**20),
                                 max_queue_wait_s=args.max_queue_wait_s,
                                 max_lead_s=args.max_lead_s if args.pace else math.inf,
                                 max_prompt_chars=args.max_prompt_chars, max_frames=args.max_frames,
                                 unbounded_max_frames=args.max_frames)
    server_config = ServerConfig(host=args.host, port=args.port,
                                 metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                                 max_message_bytes=args.max_message_bytes, max_waiting=args.max_waiting,
                                 token=_read_token(args.token_file), tls_cert=args.tls_cert, tls_key=args.tls_key,
                                 drain_timeout_s=args.drain_timeout_s, stall_timeout_s=args.stall_timeout_s,
                                 max_buffered_chunks=args.max_buffered_chunks,
                                 keyframe_interval_s=args.keyframe_interval_s, jpeg_quality=args.jpeg_quality,
                                 h264_crf=args.h264_crf, warm_up_chunks=args.warm_up_chunks)
    return run(source, engine_config, server_config, log_format=args.log_format, log_level=args.log_level)


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "info": cmd_info, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:
        print(f"streamgen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
