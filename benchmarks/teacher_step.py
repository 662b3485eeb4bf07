"""One teacher training step: forward + backward + AdamW, in fp32 and under bf16 autocast (on this CPU by default).

    python benchmarks/teacher_step.py                          # default teacher, batch 4 x 6 latent frames, both
    python benchmarks/teacher_step.py --batch 8 --frames 12 --precision fp32   # the horizon-12 teacher's step

What ``precision: auto`` (trainer.common.precision) decides by CPU flags, measured: on an AVX2-only CPU
bf16 autocast is emulated and a step runs tens of times slower than fp32; with AVX512-BF16 or AMX it is
the fast path. Random weights and inputs (the cost does not depend on them); one warm-up step, then the
median of ``--steps`` timed ones. Prints one JSON line per precision. ``--device cuda`` times the same
step on a GPU (bf16 autocast on the device; each timing waits for the device's queued kernels).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from streamgen.config import get_preset
from streamgen.device import DEVICE_HELP, device_info, resolve_device, synchronize
from streamgen.model.transformer import CausalWanTransformer
from trainer.teacher import TeacherForward


def step_times(preset_name: str, batch: int, frames: int, bf16: bool, steps: int,
               device: torch.device | None = None) -> list[float]:
    preset = get_preset(preset_name)
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = TeacherForward(CausalWanTransformer(preset.model)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, preset.model.latent_channels, frames, preset.latent_height, preset.latent_width).to(device)
    emb = torch.randn(batch, preset.model.text_max_tokens, preset.model.text_dim).to(device)
    t = (torch.rand(batch) * 1000).to(device)
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            v = model(x, t, emb)
        loss = F.mse_loss(v.float(), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=6, help="latent frames (the teacher's horizon)")
    p.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the trainer's run.num_threads)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    args = p.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        p.exit(2, f"benchmarks/teacher_step.py: error: {exc}\n")
    torch.set_num_threads(args.threads)
    for precision in ("fp32", "bf16") if args.precision == "both" else (args.precision,):
        times = step_times(args.preset, args.batch, args.frames, precision == "bf16", args.steps, device)
        print(json.dumps({"precision": precision, "batch": args.batch, "frames": args.frames,
                          "threads": args.threads, "median_s": round(statistics.median(times), 3),
                          "steps_s": [round(x, 3) for x in times], "machine": platform.machine(),
                          "device": device_info(device).describe()}), flush=True)


if __name__ == "__main__":
    main()
