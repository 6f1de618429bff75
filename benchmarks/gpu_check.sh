#!/usr/bin/env bash
# GPU check of the GaMPEN network (paper preset, Table 3, 239x239 px): under 5 minutes, no
# network access, needs only torch + numpy + this repo's gampen_ml model/infer code.
#
# Measures, on synthetic galaxies:
#   train        optimizer steps/s and images/s: bf16 autocast, channels-last, AdamW, batch B,
#                eager and (GPU_CHECK_COMPILE=1) torch.compile'd, with the compile time;
#   mc_dropout   passes/s of the production path gampen_ml.infer.mc_dropout_samples
#                (head once per galaxy, stochastic tail over galaxies x passes in tail
#                batches of GPU_CHECK_ROWS rows, bf16), eager and with a compiled tail;
#   flops        model FLOPs per training image and per MC pass (torch FlopCounterMode), so
#                the achieved TFLOP/s can be compared with the card's peak.
# Every section is written to the JSON as soon as it is done (a timeout keeps what ran).
# On CPU it runs the same code on a tiny stand-in network in seconds (tests cover it).
#
# Usage:  benchmarks/gpu_check.sh [out.json]      (default: $OUT/gpu_check.json or ./gpu_check.json)
# Knobs (GPU defaults / CPU defaults):
#   GPU_CHECK_STEPS (60/3) timed training steps   GPU_CHECK_BATCH (128/4) training batch
#   GPU_CHECK_PASSES (1024/8) MC passes per galaxy GPU_CHECK_GALAXIES (16/4)
#   GPU_CHECK_ROWS (512/16) tail rows per call     GPU_CHECK_COMPILE (1/0) also torch.compile
#   GPU_CHECK_BUDGET_S (270) skip remaining sections past this   PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_JSON="${1:-${OUT:-.}/gpu_check.json}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 295 "$PYTHON" - "$OUT_JSON" <<'PY'
import dataclasses, json, math, os, platform, sys, time, traceback

import types

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

try:  # GPU images may lack polars; gampen_ml.data imports it only for the shard tables
    import polars  # noqa: F401
except ImportError:
    sys.modules["polars"] = types.ModuleType("polars")

from gampen_ml.config import PAPER, NetworkConfig
from gampen_ml.infer import mc_dropout_samples
from gampen_ml.model import GaMPEN, gaussian_nll

T0 = time.perf_counter()
out_path = sys.argv[1]
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
env = lambda name, gpu, cpu: int(os.environ.get(name, gpu if cuda else cpu))
steps, batch = env("GPU_CHECK_STEPS", 60, 3), env("GPU_CHECK_BATCH", 128, 4)
passes, galaxies = env("GPU_CHECK_PASSES", 1024, 8), env("GPU_CHECK_GALAXIES", 16, 4)
rows, use_compile = env("GPU_CHECK_ROWS", 512, 16), bool(env("GPU_CHECK_COMPILE", 1, 0))
budget_s = env("GPU_CHECK_BUDGET_S", 270, 100)
if cuda:
    network, px = PAPER.network, PAPER.imaging.stamp_size_px
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
else:  # tiny stand-in so the script is testable anywhere
    network = NetworkConfig(width_multiplier=0.0625, fc_width=16, stn_output_px=32,
                            stn_localization_pool=1)
    px = 48
autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
sync = torch.cuda.synchronize if cuda else (lambda: None)
peak_mem = lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
result = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
          "torch": torch.__version__, "image_px": px, "network": dataclasses.asdict(network),
          "compile_requested": use_compile, "sections_skipped": [], "errors": {}}


def save():
    result["elapsed_s"] = round(time.perf_counter() - T0, 1)
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=2)


def section(name, fn):
    """Run one measurement; record its result or its error; skip it past the budget."""
    if time.perf_counter() - T0 > budget_s:
        result["sections_skipped"].append(name)
        print("skipped", name, "(time budget)")
        return save()
    try:
        result[name] = fn()
        print(name, result[name], flush=True)
    except Exception as exc:  # keep the other sections
        result["errors"][name] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    save()


# Synthetic galaxies: Gaussian blobs whose amplitude/size follow three labels, in nJy.
def galaxies_batch(n, g):
    y = torch.randn(n, 3, device=device, generator=g)
    r = torch.arange(px, device=device, dtype=torch.float32) - (px - 1) / 2
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    width = (px / 12) * torch.exp(0.3 * y[:, 1])[:, None, None]
    img = 300 * torch.exp(0.5 * y[:, 0])[:, None, None] * torch.exp(-r2 / (2 * width**2))
    img = img * (1 + 0.2 * y[:, 2, None, None])
    return img + 2.3 * torch.randn(n, px, px, device=device, generator=g), y


g = torch.Generator(device=device).manual_seed(0)
torch.manual_seed(0)
model = GaMPEN(network, 7e-4, px).to(device, memory_format=torch.channels_last)
data = []
for _ in range(4):
    img, y = galaxies_batch(batch, g)
    data.append((torch.asinh(img).unsqueeze(1).contiguous(memory_format=torch.channels_last), y))


def flops():
    x = data[0][0][:2]
    with FlopCounterMode(display=False) as fc:
        gaussian_nll(model(x), data[0][1][:2]).backward()
    train_per_image = fc.get_total_flops() / 2
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        head = model.deterministic_head(x[:1])
        with FlopCounterMode(display=False) as fh:
            model.deterministic_head(x[:1])
        with FlopCounterMode(display=False) as ft:
            model.stochastic_tail(head)
    return {"train_GFLOP_per_image": round(train_per_image / 1e9, 2),
            "head_GFLOP_per_galaxy": round(fh.get_total_flops() / 1e9, 2),
            "tail_GFLOP_per_pass": round(ft.get_total_flops() / 1e9, 2)}


def train(compiled):
    torch.manual_seed(0)
    net = GaMPEN(network, 7e-4, px).to(device, memory_format=torch.channels_last)
    step_net = torch.compile(net) if compiled else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-4,
                                  fused=cuda or None)
    net.train()
    losses = []

    def step(i):
        x, y = data[i % len(data)]
        with autocast():
            out = step_net(x)
        loss = gaussian_nll(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return loss

    t = time.perf_counter()
    for i in range(3):  # warm-up (and compilation)
        step(i)
    sync()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        loss = step(i)
        if i % 20 == 0 or i == steps - 1:
            losses.append(loss)
    sync()
    seconds = time.perf_counter() - t
    losses = [round(v.item(), 4) for v in losses]
    return {"batch_size": batch, "steps": steps, "seconds": round(seconds, 3),
            "images_per_s": round(steps * batch / seconds, 1),
            "seconds_per_step": round(seconds / steps, 4),
            "warmup_3_steps_s": round(warmup_s, 1),
            "losses": losses, "finite": all(math.isfinite(v) for v in losses),
            "max_memory_GiB": peak_mem()}


mc_images = galaxies_batch(galaxies, g)[0].cpu().numpy()


def mc(compiled):
    torch.manual_seed(0)
    net = GaMPEN(network, 0.01, px).to(device, memory_format=torch.channels_last)
    if compiled:
        net.stochastic_tail = torch.compile(net.stochastic_tail, dynamic=False)
    with torch.no_grad(), autocast():
        head = net.deterministic_head(data[0][0][:1])
    per_pass = head[0].numel() * head.element_size()
    tc = max(1, rows // galaxies)
    kw = dict(seed=1, device=device, galaxies_per_batch=galaxies, passes_per_chunk=tc,
              tail_batch_bytes=rows * per_pass, autocast_bf16=True)
    t = time.perf_counter()
    for _ in mc_dropout_samples(net, mc_images, tc, **kw):  # warm-up (and compilation)
        pass
    sync()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    chunks = [s for _, s in mc_dropout_samples(net, mc_images, passes, **kw)]
    sync()
    seconds = time.perf_counter() - t
    samples = np.concatenate(chunks)
    return {"galaxies": galaxies, "passes": passes, "rows_per_tail_call": tc * galaxies,
            "seconds": round(seconds, 3), "passes_per_s": round(galaxies * passes / seconds, 1),
            "galaxies_per_s_at_1000_passes": round(galaxies * passes / seconds / 1000, 2),
            "warmup_s": round(warmup_s, 1), "finite": bool(np.isfinite(samples).all()),
            "mean_mc_std": round(float(samples.std(1).mean()), 5), "max_memory_GiB": peak_mem(),
            **exactness()}


def exactness():
    # forward == stochastic_tail o deterministic_head with dropout off (fp32).
    model.eval()
    with torch.no_grad():
        x = data[0][0][:2]
        return {"head_tail_max_abs_diff": (model(x) - model.stochastic_tail(
            model.deterministic_head(x))).abs().max().item()}


section("flops", flops)
section("train", lambda: train(False))
section("mc_dropout", lambda: mc(False))
if use_compile:
    section("mc_dropout_compiled", lambda: mc(True))
    section("train_compiled", lambda: train(True))
f = result.get("flops", {})
for key, per in (("train", "train_GFLOP_per_image"), ("train_compiled", "train_GFLOP_per_image"),
                 ("mc_dropout", "tail_GFLOP_per_pass"),
                 ("mc_dropout_compiled", "tail_GFLOP_per_pass")):
    if key in result and per in f:
        rate = result[key].get("images_per_s") or result[key].get("passes_per_s")
        result[key]["achieved_TFLOP_per_s"] = round(rate * f[per] / 1e3, 1)
save()
print(json.dumps({k: result[k] for k in result if k != "network"}, indent=1))
print("wrote", out_path)
PY
