"""MC-dropout inference: ``gampen_ml.infer.mc_dropout_samples`` vs the original loop pattern.

The reference imitates the original code's pattern: one galaxy and one pass at a time, the
whole network (STN included) rerun on every pass with torch's stock ``F.affine_grid`` and
``nn.Dropout`` (:mod:`benchmarks.reference`), then one NumPy MVN draw per pass. Ours
computes the deterministic head once per galaxy and runs only the stochastic tail over
galaxies x passes in cache-sized channels-last batches with vectorized draws. Same network,
same process, same torch thread count for both.

The headline ratio is per network pass (like for like: one pass, one draw in both). The
profile's ``draws_per_pass`` K (quick: 10) is reported separately as samples/s: it is a
modelling choice of the platform (K draws per pass), not an implementation speed-up.

Run::

    .venv/bin/python -m benchmarks.bench_inference [--profile quick] [--galaxies 64]
        [--passes 40] [--ref-galaxies 2] [--ref-passes 30] [--threads 2]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.reference import reference_model
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
    parser.add_argument("--galaxies", type=int, default=64)
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--ref-galaxies", type=int, default=2)
    parser.add_argument("--ref-passes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
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
    ref_model = reference_model(model)  # same weights; stock affine_grid and nn.Dropout
    reference_samples(ref_model, images[:1], 2, seed=0, device=device)

    def ours(draws_per_pass: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in mc_dropout_samples(
            model,
            images,
            args.passes,
            seed=1,
            device=device,
            galaxies_per_batch=profile.inference.galaxies_per_batch,
            draws_per_pass=draws_per_pass,
        ):
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    def ref() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        reference_samples(
            ref_model, images[: args.ref_galaxies], args.ref_passes, seed=1, device=device
        )
        return time.perf_counter() - t0, time.process_time() - c0

    # Interleaved repeats (ours, reference, ours K, ...), medians: load drift on a shared
    # machine hits both sides alike. Wall-clock and process CPU time are both reported.
    k = profile.inference.draws_per_pass
    runs = {"ours": [], "ref": [], "ours_k": []}
    for _ in range(args.repeats):
        runs["ours"].append(ours(1))
        runs["ref"].append(ref())
        runs["ours_k"].append(ours(k))
    n_ours, n_ref = args.galaxies * args.passes, args.ref_galaxies * args.ref_passes
    med = {key: np.median(np.array(v), axis=0) for key, v in runs.items()}  # (wall, cpu)
    rate = {
        "ours": n_ours / med["ours"],
        "ours_k": n_ours * k / med["ours_k"],
        "ref": n_ref / med["ref"],
    }
    print(
        f"profile {profile.name}: {px} px images, STN output {profile.network.stn_output_px} px, "
        f"width x{profile.network.width_multiplier}, device {device}, "
        f"torch threads {torch.get_num_threads()} (both), median of {args.repeats} "
        "interleaved repeats; rates as wall / CPU-time"
    )
    print(
        f"ours      {args.galaxies} galaxies x {args.passes} passes, K=1: "
        f"{rate['ours'][0]:8.1f} / {rate['ours'][1]:8.1f} passes/s (= samples/s)"
    )
    print(
        f"ours      {args.galaxies} galaxies x {args.passes} passes, K={k}: "
        f"{rate['ours_k'][0]:8.1f} / {rate['ours_k'][1]:8.1f} samples/s"
    )
    print(
        f"reference {args.ref_galaxies} galaxies x {args.ref_passes} passes: "
        f"{rate['ref'][0]:8.1f} / {rate['ref'][1]:8.1f} passes/s (= samples/s)"
    )
    r1, rk = rate["ours"] / rate["ref"], rate["ours_k"] / rate["ref"]
    print(f"speed-up per pass (K=1 both):        wall {r1[0]:6.1f} x   CPU {r1[1]:6.1f} x")
    print(f"speed-up per sample (K={k} vs 1 draw): wall {rk[0]:6.1f} x   CPU {rk[1]:6.1f} x")


if __name__ == "__main__":
    main()
