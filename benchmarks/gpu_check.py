"""One prepared check of the GPU path (docs/gpu-check.md): the device and versions, every clipping engine against
Opacus's hooks on the device, critic-step and generator-update timings at the paper's scale, and every script end
to end on phantoms of the paper's volume shape, each part timed and reported on its own; JSON to --out, a short
table on stdout.

    python benchmarks/gpu_check.py --out gpu_check.json                       # on one GPU: within 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out gpu_check_quick.json     # the same at tiny scale, seconds
    python benchmarks/gpu_check.py --parts equivalence critic_steps --out x.json
A part that fails is reported with its error and the others still run; the exit status is 1 if any failed.
"""

import json
import os
import resource
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gb():
    """This process's peak resident set, GiB: VmHWM (ru_maxrss would count the parent's, which exec keeps)."""
    status = Path("/proc/self/status")
    lines = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")] \
        if status.is_file() else []
    return int(lines[0]) / 2 ** 20 if lines else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_memory():
    """This process's peak memory, GiB: the resident set's, and the GPU allocator's if it used a GPU."""
    torch = sys.modules.get("torch")
    gpu = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"peak_rss_gb": round(peak_rss_gb(), 3),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if gpu else None,
            "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 2 ** 30, 3) if gpu else None}


def run_script(memory_json, script, *args):
    """Child mode (--script MEMORY_JSON SCRIPT ARGS...): run SCRIPT as `python SCRIPT ARGS` does, then write its
    peak memory to MEMORY_JSON. Imports nothing first, so a script that needs no torch does not load it."""
    sys.argv = [str(ROOT / script), *args]
    sys.path.insert(0, str(ROOT))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        Path(memory_json).write_text(json.dumps(peak_memory()))


if __name__ == "__main__" and sys.argv[1:2] == ["--script"]:
    run_script(*sys.argv[2:])
    sys.exit(0)

import argparse  # noqa: E402
import copy  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import opacus  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gan_update  # noqa: E402
from bench_critic_step import device_name, measure, setup  # noqa: E402

import run_gan  # noqa: E402
from utils import bookkeeping, gan_steps  # noqa: E402
from utils.common import resolve_device  # noqa: E402

warnings.filterwarnings("ignore", message="Secure RNG turned off")  # seeded noise: a check, not a release
PARTS = ("environment", "equivalence", "critic_steps", "generator_updates", "end_to_end")
TOLERANCE = 1e-3  # relative distance of an engine's update from the hooks engine's (float32, TF32 off)
# The two scales: the paper's on a GPU, and --quick, which runs the same code in seconds on a CPU.
SCALES = {
    "full": dict(ndf=96, batches=(32, 128, 512), demo=(16, 64, 32), engine_batch=32, seconds=2.0, repeats=3,
                 model=(96, 96, 32, 5), updates=5, n_patches=2000, sync_updates=3, preset="gpu_check", epochs=3),
    "quick": dict(ndf=4, batches=(8, 16), demo=(4, 64, 8), engine_batch=8, seconds=0.05, repeats=1,
                  model=(4, 4, 8, 2), updates=1, n_patches=64, sync_updates=2, preset="tiny", epochs=1),
}


def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])


def relative_distance(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- (a) the device and versions ----
def environment(device, scale):
    info = {"device": device_name(device), "device_type": device.type, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "opacus": opacus.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gb=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
    info["summary"] = (f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, opacus {info['opacus']}, "
                       f"Python {info['python']}")
    return info


# ---- (b) every engine gives the hooks engine's update, on the device ----
def private_update(critic, n_data, real, fake, mode, noise, max_norm, device):
    """The change of the critic's parameters by one strict private step (SGD, lr 1, no weight clamp) of a copy."""
    critic = copy.deepcopy(critic)
    start = flat(critic.parameters()).clone()
    batch = len(fake)
    private, dp_opt, _, _ = gan_steps.make_private_critic(
        critic, torch.optim.SGD(critic.parameters(), lr=1.0), n_data, batch / n_data, batch, noise, max_norm, mode,
        noise_generator=torch.Generator(device=device).manual_seed(5))
    gan_steps.private_critic_step(private, dp_opt, real, fake, clip_param_w=None)
    return flat(critic.parameters()) - start


def amp_bound(critic, batch, max_norm, device):
    """bk under bfloat16 autocast (--amp): the largest move of the clipped sum by removing one sample, over C (at
    most 1), and the cosine between the bfloat16 and float32 sums."""
    def clipped_sum(samples, amp):
        critic.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16) if amp else nullcontext():
            bookkeeping.clipped_gradient_sum(critic, samples, lambda s, rows: -s, max_norm)
        return flat(p.grad for p in critic.parameters())
    total = clipped_sum(batch, True)
    moves = [float((total - clipped_sum(torch.cat([batch[:i], batch[i + 1:]]), True)).norm()) / max_norm
             for i in range(len(batch))]
    cosine = float(torch.nn.functional.cosine_similarity(total, clipped_sum(batch, False), dim=0))
    return {"max_move_over_c": round(max(moves), 6), "cosine_to_float32": round(cosine, 6),
            "ok": max(moves) <= 1 + 1e-5 and cosine > 0.99}


def equivalence(device, scale):
    critic, data, real, fake = setup("paper", scale["ndf"], 96, 8, device)
    real = real[:5]  # a Poisson batch of 5 real samples, 8 fake ones: B = 8
    probe = copy.deepcopy(critic)
    _, norms = bookkeeping.clipped_gradient_sum(probe, torch.cat([real, fake]), lambda s, rows: s, 1.0)
    max_norm = float(norms.median())  # some samples clipped, some not
    results, ok = [], True
    # TF32 off: the engines compute their gradients by different kernels, whose TF32 rounding (1e-3) would hide
    # what is compared here.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        for noise in (0.0, 1.3):
            reference = private_update(critic, len(data), real, fake, "hooks", noise, max_norm, device)
            for mode in gan_steps.GRAD_SAMPLE_MODES:
                if mode == "hooks":
                    continue
                try:
                    distance = relative_distance(private_update(critic, len(data), real, fake, mode, noise, max_norm,
                                                                device), reference)
                    row = {"mode": mode, "noise": noise, "relative_distance": distance, "ok": distance <= TOLERANCE}
                except Exception as err:
                    row = {"mode": mode, "noise": noise, "error": f"{type(err).__name__}: {err}"[:300], "ok": False}
                ok &= row["ok"]
                results.append(row)
        amp = amp_bound(probe, torch.cat([real, fake]), max_norm, device)
    worst = max((r.get("relative_distance", float("inf")) for r in results), default=float("nan"))
    return {"ok": ok and amp["ok"], "critic_ndf": scale["ndf"], "max_norm": max_norm, "tolerance": TOLERANCE,
            "engines": results, "amp": amp,
            "summary": f"{len(results)} engine x noise updates vs hooks, worst relative distance {worst:.1e}; "
                       f"amp: one sample moves the sum by <= {amp['max_move_over_c']:.3f} C, "
                       f"cosine to float32 {amp['cosine_to_float32']:.4f}"}


# ---- (c) critic steps ----
def critic_steps(device, scale):
    configs = [("paper", scale["ndf"], 96, b, "bk", amp) for b in scale["batches"] for amp in (False, True)]
    configs += [("paper", scale["ndf"], 96, scale["engine_batch"], m, False) for m in gan_steps.GRAD_SAMPLE_MODES
                if m != "bk"]
    ndf, size, batch = scale["demo"]
    configs += [("dcgan", ndf, size, batch, "bk", amp) for amp in (False, True)]
    rows = []
    for arch, ndf, size, batch, mode, amp in configs:
        r = measure(mode, arch, ndf, size, batch, scale["repeats"], scale["seconds"], device, amp)
        rows.append({"arch": arch, "ndf": ndf, "size": size, "batch": batch, "mode": mode, "amp": amp, **r})
    failed = [r for r in rows if "error" in r]
    paper = [r for r in rows if r["arch"] == "paper" and r["mode"] == "bk" and "error" not in r]
    return {"ok": not failed, "steps": rows,
            "summary": "; ".join(f"b{r['batch']}{' amp' if r['amp'] else ''} {r['dp_s'] * 1e3:.1f}/"
                                 f"{r['plain_s'] * 1e3:.1f} ms" for r in paper) + " (bk/plain, paper critic)"}


# ---- (d) whole generator updates ----
def count_host_syncs(trial, args, updates, device):
    """Synchronising CUDA calls in `updates` generator updates (torch.cuda.set_sync_debug_mode), and where the first
    one happens; None on a CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(updates):
                run_gan.generator_update(trial, args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message)]
    where = None
    if found:  # once more, stopping at the first: its traceback names the line
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_gan.generator_update(trial, args)
        except RuntimeError:
            where = traceback.format_exc(limit=-4)[-1500:]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"per_update": len(found) / updates, "first": where}


def generator_updates(device, scale):
    ndf, ngf, batch, n_discr = scale["model"]
    flags = bench_gan_update.model_flags(ndf, ngf, batch, n_discr, device, "bk")
    kinds = {"plain": ["--noisem", "inf"], "private": ["--noisem", "1"], "plain_amp": ["--noisem", "inf", "--amp"],
             "private_amp": ["--noisem", "1", "--amp"]}
    rows = {}
    with bench_gan_update.random_patches(scale["n_patches"], 96):
        for kind, extra in kinds.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trial, args = bench_gan_update.start_trial([kind, *extra, *flags])
            seconds = bench_gan_update.time_trial_updates(trial, args, scale["updates"], device)
            rows[kind] = {"seconds_per_update": round(seconds, 4),
                          "projected_hours": bench_gan_update.projected_hours(seconds),
                          "host_syncs": count_host_syncs(trial, args, scale["sync_updates"], device),
                          "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
                          if device.type == "cuda" else None}
            del trial, args
    syncs = [r["host_syncs"]["per_update"] for r in rows.values() if r["host_syncs"] is not None]
    return {"ok": not any(syncs), "model": dict(ndf=ndf, ngf=ngf, batch=batch, n_discr=n_discr, engine="bk"),
            "paper_updates": bench_gan_update.PAPER_UPDATES, "kinds": rows,
            "summary": f"private {rows['private']['seconds_per_update']:.3f} s, plain "
                       f"{rows['plain']['seconds_per_update']:.3f} s per update; the paper's "
                       f"{bench_gan_update.PAPER_UPDATES:,}: {rows['private']['projected_hours']} h / "
                       f"{rows['plain']['projected_hours']} h; host syncs per update: "
                       f"{'not checked on a CPU' if not syncs else max(syncs)}"}


# ---- (e) the scripts end to end ----
def end_to_end(device, scale, timeout, keep=None):
    epoch, select = str(scale["epochs"] - 1), ["--trial", "gpu_check", "--thresh", "0.8"]
    dev = ["--device", str(device)]
    steps = [("make_phantoms.py", []), ("extract_patches.py", ["--split", "train"]),
             ("run_gan.py", ["--trial", "gpu_check", "--noisem", "1", "--epochs", str(scale["epochs"]), *dev]),
             ("generate_samples.py", [*select, "--epoch", epoch, *dev]),
             ("run_unet.py", [*select, "--epoch", epoch, *dev]), ("eval_unet.py", [*select, "--epoch", epoch, *dev])]
    rows, ok = [], True
    with (nullcontext(keep) if keep else tempfile.TemporaryDirectory()) as folder:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DPGAN_PRESET=scale["preset"], DPGAN_DATA_DIR=str(folder / "data"),
                   DPGAN_WORK_DIR=str(folder / "work"), MPLBACKEND="Agg")
        for script, args in steps:
            memory, log = folder / f"{script}.memory.json", folder / f"{script}.log"
            if not ok:
                rows.append({"script": script, "skipped": "an earlier step failed"})
                continue
            start = time.perf_counter()
            try:
                with open(log, "w") as out:
                    rc = subprocess.run([sys.executable, __file__, "--script", str(memory), script, *args], cwd=ROOT,
                                        env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {timeout} s"
            row = {"script": script, "seconds": round(time.perf_counter() - start, 2), "rc": rc,
                   **(json.loads(memory.read_text()) if memory.is_file() else {})}
            if rc != 0:
                ok = False
                row["error"] = log.read_text()[-1500:]
            rows.append(row)
        results = sorted((folder / "work" / "results").glob("*_results.json"))
        outcome = json.loads(results[0].read_text()) if results else {}
    peak = max((r.get("peak_gpu_gb") or 0 for r in rows), default=0)
    return {"ok": ok, "preset": scale["preset"], "steps": rows,
            "result": {k: outcome.get(k) for k in ("epsilon", "val_dsc", "test_dsc", "test2_dsc") if k in outcome},
            "summary": ", ".join(f"{r['script'].removesuffix('.py')} {r['seconds']:.0f} s" for r in rows
                                 if "seconds" in r) + (f"; peak GPU {peak:.2f} GiB" if device.type == "cuda" else "")}


def run_part(name, function):
    """{ok, seconds, error, ...}: the part's own result, or its error; never raises."""
    start = time.perf_counter()
    try:
        result = function()
    except Exception as err:
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                  "traceback": traceback.format_exc()[-3000:]}
    return {"ok": result.pop("ok"), "seconds": round(time.perf_counter() - start, 2), **result}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--device", default="auto", help="auto (GPU if there is one, the default), cuda, cuda:1, cpu")
    p.add_argument("--quick", action="store_true", help="tiny scale: the same code in seconds (for a CPU, and tests)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="the parts to run (default: all)")
    p.add_argument("--step_timeout", type=int, default=300, help="seconds each script of end_to_end may take")
    p.add_argument("--keep", default=None, help="end_to_end: keep its data and outputs in this folder")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    scale = SCALES["quick" if args.quick else "full"]
    functions = {"environment": lambda: {"ok": True, **environment(device, scale)},
                 "equivalence": lambda: equivalence(device, scale), "critic_steps": lambda: critic_steps(device, scale),
                 "generator_updates": lambda: generator_updates(device, scale),
                 "end_to_end": lambda: end_to_end(device, scale, args.step_timeout, args.keep)}
    report = {"command": " ".join(sys.argv if argv is None else ["gpu_check.py", *argv]),
              "scale": "quick" if args.quick else "full", "parts": {}}
    print(f"{'part':<18} {'ok':<4} {'seconds':>8}  summary", flush=True)
    for name in args.parts:
        report["parts"][name] = result = run_part(name, functions[name])
        summary = result.get("summary") or result.get("error", "")
        print(f"{name:<18} {'yes' if result['ok'] else 'NO':<4} {result['seconds']:>8.1f}  {summary}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))  # a later part's crash keeps these
    report["ok"] = all(r["ok"] for r in report["parts"].values())
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"all parts ok: {report['ok']}; JSON: {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
