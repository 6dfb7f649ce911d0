"""Cost of privacy per critic step: one strict DP critic step (utils.gan.private_critic_step: per-sample
gradients, clipping, noise, accounting) against one non-private step (utils.gan.plain_critic_step) of the same
critic on the same batch, for each per-sample clipping engine (bk and Opacus's), each with its peak memory.

    python benchmarks/bench_critic_step.py                      # ndf 16 and 96, every mode; last line JSON
    python benchmarks/bench_critic_step.py --ndf 96 --repeats 2 --modes hooks ghost
    python benchmarks/bench_critic_step.py --arch dcgan --size 64 --ndf 16   # the demo's critic
Each engine runs in a process of its own (--no-processes: one after the other in this one, freed in between), so
that one engine's memory is not another's and its peak is its own: the resident set's peak on the CPU (imports and
data included: `before` is the resident set when the steps start), the allocator's peak on a GPU. DP and
non-private steps alternate, so load from other processes affects both alike; medians are reported.
"""

import argparse
import copy
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DCGANCritic, Discriminator  # noqa: E402
from utils.common import resolve_device  # noqa: E402
from utils.gan_steps import (  # noqa: E402
    GRAD_SAMPLE_MODES,
    make_private_critic,
    plain_critic_step,
    private_critic_step,
)


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def setup(arch, ndf, size, batch_size, device, seed=0):
    """(critic, data, real, fake): a fresh critic on `device`; random data of 4 batches on the host (the private
    loader's data: it sets q = 1/4); a real batch (its first) and a fake batch on `device`."""
    torch.manual_seed(seed)
    critic = (Discriminator(ndf=ndf) if arch == "paper" else DCGANCritic(ndf=ndf, size=size)).to(device)
    data = torch.randn(4 * batch_size, 2, size, size)
    return critic, data, data[:batch_size].to(device), torch.randn(batch_size, 2, size, size, device=device)


def memory_gb(device, peak=True):
    """GiB: on a GPU the allocator's peak since the last reset (peak) or its current use; on the CPU the peak of
    this process's resident set (never reset; VmHWM: ru_maxrss would count the parent's, which exec keeps)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2 ** 30
    status = Path("/proc/self/status")
    hwm = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")] \
        if status.is_file() else []
    return int(hwm[0]) / 2 ** 20 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bench_mode(mode, critic, data, real, fake, batch_size, repeats, seconds, device, amp=False):
    """Median seconds of (DP step, non-private step) for one engine; amp: both under bfloat16 autocast, as
    run_gan.py --amp runs them."""
    plain = copy.deepcopy(critic)
    plain_opt = torch.optim.RMSprop(plain.parameters(), lr=5e-5)
    dp_critic = copy.deepcopy(critic)
    private, dp_opt, _, _ = make_private_critic(dp_critic, torch.optim.RMSprop(dp_critic.parameters(), lr=5e-5),
                                                len(data), batch_size / len(data), batch_size, 1.0, 1.0, mode)
    autocast = torch.autocast(device.type, torch.bfloat16) if amp else nullcontext()
    dp_times, plain_times = [], []
    rounds = repeats + 1  # the first round warms up and is not counted
    i = 0
    with autocast:
        while i < rounds:
            dp = timed(lambda: private_critic_step(private, dp_opt, real, fake, 0.01), device)
            np_ = timed(lambda: plain_critic_step(plain, plain_opt, real, fake, 0.01), device)
            if i:
                dp_times.append(dp)
                plain_times.append(np_)
            else:  # short steps vary more: repeat them until the timed rounds take about `seconds`
                rounds = max(rounds, 1 + math.ceil(seconds / (dp + np_)))
            i += 1
    return statistics.median(dp_times), statistics.median(plain_times)


def measure(mode, arch, ndf, size, batch_size, repeats, seconds, device, amp=False):
    """One engine on a fresh critic: {dp_s, plain_s, ratio, peak_gb, before_gb}, or {error} if it fails here.
    What an earlier call made is freed first (its cycles collected; on a GPU the cache emptied, the peak reset)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        critic, data, real, fake = setup(arch, ndf, size, batch_size, device)
        before = memory_gb(device, peak=device.type != "cuda")
        dp, plain = bench_mode(mode, critic, data, real, fake, batch_size, repeats, seconds, device, amp)
        return {"dp_s": round(dp, 5), "plain_s": round(plain, 5), "ratio": round(dp / plain, 3),
                "peak_gb": round(memory_gb(device), 3), "before_gb": round(before, 3)}
    except Exception as err:  # report the engines that do not work here and go on with the others
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def measure_in_process(mode, ndf, args):
    """measure() in a child process of its own (its peak memory is its own), through --child."""
    command = [sys.executable, __file__, "--child", "--modes", mode, "--ndf", str(ndf), "--arch", args.arch,
               "--size", str(args.size), "--batch_size", str(args.batch_size), "--repeats", str(args.repeats),
               "--seconds", str(args.seconds), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:  # killed (for memory: -9) or crashed before it could say why
        return {"error": f"process exited with {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


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
    p.add_argument("--processes", action=argparse.BooleanOptionalAction, default=True,
                   help="each engine in a process of its own (default), so that its peak memory is its own")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one engine; prints its JSON line
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.child:
        print(json.dumps(measure(args.modes[0], args.arch, args.ndf[0], args.size, args.batch_size, args.repeats,
                                 args.seconds, device)))
        return
    name = device_name(device)
    peak_what = "GPU allocator peak" if device.type == "cuda" else "peak resident set, before: when the steps start"
    results, ratios = [], {}
    for ndf in args.ndf:
        critic = setup(args.arch, ndf, args.size, 1, "cpu")[0]
        n_params = sum(p.numel() for p in critic.parameters())
        del critic
        print(f"{args.arch} critic ndf={ndf} ({n_params / 1e6:.2f} M parameters), {args.size} x {args.size}, "
              f"batch {args.batch_size} real + {args.batch_size} fake, {name}, median of at least {args.repeats} steps "
              f"(about {args.seconds:g} s) after one warm-up; each engine "
              f"{'in its own process' if args.processes else 'freed before the next'}")
        print(f"{'mode':<10} {'DP s':>9} {'non-private s':>14} {'ratio':>7} {'peak GiB':>9} {'before':>7}  "
              f"({peak_what})")
        for mode in args.modes:
            r = measure_in_process(mode, ndf, args) if args.processes else measure(
                mode, args.arch, ndf, args.size, args.batch_size, args.repeats, args.seconds, device)
            results.append({"ndf": ndf, "mode": mode, **r})
            if "error" in r:
                print(f"{mode:<10} {'-':>9} {'-':>14} {'-':>7} {'-':>9} {'-':>7}  fails: {r['error'][:200]}",
                      flush=True)
                continue
            ratios[(ndf, mode)] = r["ratio"]
            print(f"{mode:<10} {r['dp_s']:>9.4f} {r['plain_s']:>14.4f} {r['ratio']:>7.2f} {r['peak_gb']:>9.2f} "
                  f"{r['before_gb']:>7.2f}", flush=True)
    measured = [m for m in args.modes if all((ndf, m) in ratios for ndf in args.ndf)]
    best = min(measured, key=lambda m: sum(ratios[(ndf, m)] for ndf in args.ndf)) if measured else None
    best_ratios = {f"ratio_ndf{ndf}": None if best is None else ratios[(ndf, best)] for ndf in args.ndf}
    print(json.dumps({"best_mode": best, **best_ratios, "device": name, "arch": args.arch, "size": args.size,
                      "engines": results}))


if __name__ == "__main__":
    main()
