"""MC-dropout inference: ``gampen_ml.infer.mc_dropout_samples`` vs the original loop pattern.

The reference imitates the original code's pattern: one galaxy and one pass at a time, the
whole network (STN included) rerun on every pass, then one NumPy MVN draw per pass. Ours
computes the deterministic head once per galaxy and runs only the stochastic tail over
galaxies x passes in large batches with vectorized draws. Same network, same process.

Run::

    .venv/bin/python benchmarks/bench_inference.py [--profile quick] [--galaxies 16]
        [--passes 200] [--ref-galaxies 2] [--ref-passes 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gampen_ml.config import get_profile
from gampen_ml.data.transforms import arsinh_image
from gampen_ml.infer import mc_dropout_samples, pick_device
from gampen_ml.model import GaMPEN, covariance


@torch.inference_mode()
def reference_samples(model, images, n_passes, seed, device):
    """Original pattern: loop over galaxies and passes, full forward each time."""
    rng = np.random.default_rng(seed)
    model.train()  # the original enabled dropout via train mode
    out = np.empty((len(images), n_passes, 3), dtype=np.float32)
    for g in range(len(images)):
        x = torch.from_numpy(arsinh_image(images[g : g + 1])[:, None]).to(device)
        for t in range(n_passes):
            params = model(x)
            mu = params[0, :3].cpu().numpy()
            sigma = covariance(params)[0].cpu().numpy()
            out[g, t] = rng.multivariate_normal(mu, sigma)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--galaxies", type=int, default=16)
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--ref-galaxies", type=int, default=2)
    parser.add_argument("--ref-passes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    device = pick_device(args.device)
    px = profile.imaging.stamp_size_px
    torch.manual_seed(0)
    model = GaMPEN(profile.network, dropout_rate=0.05, image_px=px).to(device)
    images = np.random.default_rng(0).normal(0, 3, (args.galaxies, px, px)).astype(np.float32)

    # warm-up (allocator, kernels)
    next(mc_dropout_samples(model, images[:1], 2, seed=0, device=device))
    reference_samples(model, images[:1], 2, seed=0, device=device)

    t0 = time.perf_counter()
    for _ in mc_dropout_samples(
        model,
        images,
        args.passes,
        seed=1,
        device=device,
        galaxies_per_batch=profile.inference.galaxies_per_batch,
    ):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    reference_samples(model, images[: args.ref_galaxies], args.ref_passes, seed=1, device=device)
    ref_s = time.perf_counter() - t0

    ours_rate = args.galaxies * args.passes / ours_s
    ref_rate = args.ref_galaxies * args.ref_passes / ref_s
    print(
        f"profile {profile.name}: {px} px images, STN output {profile.network.stn_output_px} px, "
        f"width x{profile.network.width_multiplier}, device {device}, threads {args.threads}"
    )
    print(
        f"ours      {args.galaxies} galaxies x {args.passes} passes: {ours_s:8.2f} s  "
        f"{ours_rate:9.1f} passes/s"
    )
    print(
        f"reference {args.ref_galaxies} galaxies x {args.ref_passes} passes: {ref_s:8.2f} s  "
        f"{ref_rate:9.1f} passes/s"
    )
    print(f"speed-up  {ours_rate / ref_rate:8.1f} x")


if __name__ == "__main__":
    main()
