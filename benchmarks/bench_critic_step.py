"""Cost of privacy per critic step: one strict DP critic step (utils.gan.private_critic_step: per-sample
gradients, clipping, noise, accounting) against one non-private step (utils.gan.plain_critic_step) of the same
critic on the same batch, for each per-sample clipping engine (bk and Opacus's), in one process.

    python benchmarks/bench_critic_step.py                      # ndf 16 and 96, every mode; last line JSON
    python benchmarks/bench_critic_step.py --ndf 96 --repeats 2 --modes hooks ghost
    python benchmarks/bench_critic_step.py --arch dcgan --size 64 --ndf 16   # the demo's critic
DP and non-private steps alternate, so load from other processes affects both alike; medians are reported.
"""

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DCGANCritic, Discriminator  # noqa: E402
from utils.common import resolve_device  # noqa: E402
from utils.gan import GRAD_SAMPLE_MODES, make_private_critic, plain_critic_step, private_critic_step  # noqa: E402


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_mode(mode, critic, data, real, fake, args, device):
    """Median seconds of (DP step, non-private step) for one engine."""
    plain = copy.deepcopy(critic)
    plain_opt = torch.optim.RMSprop(plain.parameters(), lr=5e-5)
    dp_critic = copy.deepcopy(critic)
    private, dp_opt, _, _ = make_private_critic(dp_critic, torch.optim.RMSprop(dp_critic.parameters(), lr=5e-5),
                                                len(data), args.batch_size / len(data), args.batch_size, 1.0, 1.0,
                                                mode)
    dp_times, plain_times = [], []
    rounds = args.repeats + 1  # the first round warms up and is not counted
    i = 0
    while i < rounds:
        dp = timed(lambda: private_critic_step(private, dp_opt, real, fake, 0.01), device)
        np_ = timed(lambda: plain_critic_step(plain, plain_opt, real, fake, 0.01), device)
        if i:
            dp_times.append(dp)
            plain_times.append(np_)
        else:  # short steps vary more: repeat them until the timed rounds take about args.seconds
            rounds = max(rounds, 1 + math.ceil(args.seconds / (dp + np_)))
        i += 1
    return statistics.median(dp_times), statistics.median(plain_times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ndf", type=int, nargs="+", default=[16, 96], help="critic widths (16: demo, 96: paper)")
    p.add_argument("--arch", default="paper", choices=("paper", "dcgan"),
                   help="the paper's critic architecture or the dcgan recipe's (the demo's: --size 64 --ndf 16)")
    p.add_argument("--size", type=int, default=96, help="patch size")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds at least")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="per engine, repeat short steps until the timed rounds take about this long")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=list(GRAD_SAMPLE_MODES), help=", ".join(GRAD_SAMPLE_MODES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    ratios = {}
    for ndf in args.ndf:
        torch.manual_seed(0)
        critic = (Discriminator(ndf=ndf) if args.arch == "paper" else DCGANCritic(ndf=ndf, size=args.size)).to(device)
        data = torch.randn(4 * args.batch_size, 2, args.size, args.size)  # the private loader's data: sets q = 1/4
        real = data[:args.batch_size].to(device)
        fake = torch.randn(args.batch_size, 2, args.size, args.size, device=device)
        n_params = sum(p.numel() for p in critic.parameters())
        print(f"{args.arch} critic ndf={ndf} ({n_params / 1e6:.2f} M parameters), {args.size} x {args.size}, "
              f"batch {args.batch_size} real + {args.batch_size} fake, {name}, median of at least {args.repeats} steps "
              f"(about {args.seconds:g} s) after one warm-up")
        print(f"{'mode':<10} {'DP s':>9} {'non-private s':>14} {'ratio':>7}  note")
        for mode in args.modes:
            try:
                dp, plain = bench_mode(mode, critic, data, real, fake, args, device)
                ratios[(ndf, mode)] = dp / plain
                print(f"{mode:<10} {dp:>9.4f} {plain:>14.4f} {dp / plain:>7.2f}", flush=True)
            except Exception as err:  # report the engines that do not work here and go on with the others
                print(f"{mode:<10} {'-':>9} {'-':>14} {'-':>7}  fails: {type(err).__name__}: {str(err)[:200]}",
                      flush=True)
    measured = [m for m in args.modes if all((ndf, m) in ratios for ndf in args.ndf)]
    best = min(measured, key=lambda m: sum(ratios[(ndf, m)] for ndf in args.ndf)) if measured else None
    best_ratios = {f"ratio_ndf{ndf}": None if best is None else round(ratios[(ndf, best)], 3) for ndf in args.ndf}
    print(json.dumps({"best_mode": best, **best_ratios, "device": name, "arch": args.arch, "size": args.size}))


if __name__ == "__main__":
    main()
