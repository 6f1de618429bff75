#!/usr/bin/env bash
# GPU check of the GaMPEN network, under 5 minutes, no network access.
#
# On CUDA: trains the `paper` preset (Table 3, 239x239 px) for GPU_CHECK_STEPS optimizer
# steps on synthetic galaxies (bf16 autocast, channels-last; torch.compile when
# GPU_CHECK_COMPILE=1), then measures Monte-Carlo-dropout throughput the way
# gampen_ml.infer does it: deterministic_head once per galaxy, stochastic_tail over
# galaxies x passes in large chunks. On CPU it runs the same code at tiny sizes in seconds
# (so the script itself can be tested anywhere).
#
# Usage:  benchmarks/gpu_check.sh [out.json]      (default: $OUT/gpu_check.json or ./gpu_check.json)
# Knobs:  GPU_CHECK_STEPS (300)  GPU_CHECK_BATCH (64)  GPU_CHECK_PASSES (1000)
#         GPU_CHECK_GALAXIES (32)  GPU_CHECK_CHUNK (500)  GPU_CHECK_COMPILE (0)  PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_JSON="${1:-${OUT:-.}/gpu_check.json}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 290 "$PYTHON" - "$OUT_JSON" <<'PY'
import json, os, sys, time, dataclasses, platform

import torch

from gampen_ml.config import PAPER, NetworkConfig
from gampen_ml.model import GaMPEN, gaussian_nll

out_path = sys.argv[1]
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
env = lambda name, gpu, cpu: int(os.environ.get(name, gpu if cuda else cpu))
steps, batch = env("GPU_CHECK_STEPS", 300, 3), env("GPU_CHECK_BATCH", 64, 4)
passes, galaxies = env("GPU_CHECK_PASSES", 1000, 8), env("GPU_CHECK_GALAXIES", 32, 4)
chunk, use_compile = env("GPU_CHECK_CHUNK", 500, 16), bool(env("GPU_CHECK_COMPILE", 0, 0))
if cuda:
    network, px = PAPER.network, PAPER.imaging.stamp_size_px
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
else:  # tiny stand-in so the script is testable on a laptop
    network = NetworkConfig(width_multiplier=0.0625, fc_width=16, stn_output_px=32,
                            stn_localization_pool=1)
    px = 48
autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
            else torch.autocast("cpu", enabled=False))
sync = torch.cuda.synchronize if cuda else (lambda: None)
result = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
          "torch": torch.__version__, "image_px": px, "network": dataclasses.asdict(network),
          "compile": use_compile}

# Synthetic galaxies: Gaussian blobs whose amplitude/size follow three labels, arsinh-scaled.
def galaxies_batch(n, g):
    y = torch.randn(n, 3, device=device, generator=g)
    r = torch.arange(px, device=device, dtype=torch.float32) - (px - 1) / 2
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    width = (px / 12) * torch.exp(0.3 * y[:, 1])[:, None, None]
    img = 300 * torch.exp(0.5 * y[:, 0])[:, None, None] * torch.exp(-r2 / (2 * width ** 2))
    img = img * (1 + 0.2 * y[:, 2, None, None]) + 2.3 * torch.randn(n, px, px, device=device, generator=g)
    return torch.asinh(img).unsqueeze(1).contiguous(memory_format=torch.channels_last), y

torch.manual_seed(0)
g = torch.Generator(device=device).manual_seed(0)
model = GaMPEN(network, 7e-4, px).to(device, memory_format=torch.channels_last)
train_step_model = torch.compile(model) if use_compile else model
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
data = [galaxies_batch(batch, g) for _ in range(8)]
losses, t_start, warmup = [], None, min(5, steps)
model.train()
for step in range(steps + warmup):
    if step == warmup:
        sync(); t_start = time.perf_counter()
    x, y = data[step % len(data)]
    with autocast:
        out = train_step_model(x)
    loss = gaussian_nll(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if step % 25 == 0 or step == steps + warmup - 1:
        losses.append(round(loss.item(), 4))
sync()
train_s = time.perf_counter() - t_start
result["train"] = {"steps": steps, "batch_size": batch, "seconds": round(train_s, 2),
                   "images_per_s": round(steps * batch / train_s, 1),
                   "seconds_per_step": round(train_s / steps, 4), "loss_every_25_steps": losses,
                   "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
                   "max_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
print("train", result["train"])

# MC dropout: head once per galaxy, tail over galaxies x passes, dropout on.
model.train()
x, _ = galaxies_batch(galaxies, g)
with torch.no_grad(), autocast:
    def mc(n_passes):
        head = model.deterministic_head(x)  # (G, w, P, P), no dropout
        outs = []
        # Repeat one galaxy's head per chunk of passes: repeating all G x T heads at once
        # would need G*T*w*P*P values (hundreds of GB at paper size).
        for gal in range(galaxies):
            for start in range(0, n_passes, chunk):
                n = min(chunk, n_passes - start)
                outs.append(model.stochastic_tail(head[gal:gal + 1].expand(n, -1, -1, -1)).float())
        return torch.cat(outs).view(galaxies, n_passes, 9)
    mc(min(passes, 16)); sync()
    t = time.perf_counter(); samples = mc(passes); sync(); mc_s = time.perf_counter() - t
    spread = samples[..., :3].std(1).mean().item()
    # Same answer as forward() for one pass (dropout off): head/tail split is exact.
    model.eval()
    full, split = model(x[:2]).float(), model.stochastic_tail(model.deterministic_head(x[:2])).float()
    split_err = (full - split).abs().max().item()
result["mc_dropout"] = {"galaxies": galaxies, "passes": passes, "chunk": chunk,
                        "seconds": round(mc_s, 3),
                        "passes_per_s": round(galaxies * passes / mc_s, 1),
                        "galaxies_per_s_at_passes": round(galaxies / mc_s, 2),
                        "mean_mc_std_of_mu": round(spread, 5), "head_tail_max_abs_diff": split_err,
                        "max_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
print("mc_dropout", result["mc_dropout"])
with open(out_path, "w") as fh:
    json.dump(result, fh, indent=2)
print("wrote", out_path)
PY
