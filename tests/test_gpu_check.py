"""benchmarks/gpu_check.py at tiny scale on the CPU (so that the GPU check never rots), and what of the GPU path a
CPU can check: a generator update reads nothing back from the training device."""

import json
import os
import subprocess
import sys

import pytest
import torch

import run_gan
from utils import gan_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_gan_update  # noqa: E402
import gpu_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


def test_the_quick_check_runs_every_part_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ)
    env.pop("DPGAN_PRESET", None)  # the check chooses its presets itself
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["scale"] == "quick" and list(report["parts"]) == list(gpu_check.PARTS)
    parts = report["parts"]
    assert all(p["ok"] and p["seconds"] >= 0 for p in parts.values())
    assert parts["environment"]["torch"] == torch.__version__ and parts["environment"]["device_type"] == "cpu"
    checked = {(r["mode"], r["noise"]) for r in parts["equivalence"]["engines"]}
    assert checked == {(m, n) for m in gan_steps.GRAD_SAMPLE_MODES if m != "hooks" for n in (0.0, 1.3)}
    assert parts["equivalence"]["amp"]["max_move_over_c"] <= 1 + 1e-5
    steps = parts["critic_steps"]["steps"]
    assert {(s["mode"], s["amp"]) for s in steps if s["arch"] == "paper"} >= {("bk", False), ("bk", True)}
    assert {s["mode"] for s in steps} == set(gan_steps.GRAD_SAMPLE_MODES) and any(s["arch"] == "dcgan" for s in steps)
    assert all(s["dp_s"] > 0 and s["plain_s"] > 0 and s["peak_gb"] > 0 for s in steps)
    updates = parts["generator_updates"]
    assert updates["paper_updates"] == 64_050 and set(updates["kinds"]) == {"plain", "private", "plain_amp",
                                                                             "private_amp"}
    assert all(k["projected_hours"] > 0 for k in updates["kinds"].values())
    scripts = [s["script"] for s in parts["end_to_end"]["steps"]]
    assert scripts == ["make_phantoms.py", "extract_patches.py", "run_gan.py", "generate_samples.py", "run_unet.py",
                       "eval_unet.py"]
    assert all(s["rc"] == 0 and s["peak_rss_gb"] > 0 for s in parts["end_to_end"]["steps"])
    assert 0 < parts["end_to_end"]["result"]["epsilon"] < float("inf")
    assert "end_to_end" in done.stdout and "all parts ok: True" in done.stdout


def test_a_failing_part_is_reported_with_its_error_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(device, scale):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(gpu_check, "equivalence", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--parts", "equivalence",
                           "environment"]) == 1
    report = json.loads(out.read_text())
    assert not report["ok"] and "RuntimeError: no such kernel" in report["parts"]["equivalence"]["error"]
    assert report["parts"]["environment"]["ok"]
    assert "NO" in capsys.readouterr().out


def counted(name, method, calls):
    def counting(self, *args, **kwargs):
        calls.append(name)
        return method(self, *args, **kwargs)
    return counting


@pytest.mark.parametrize("kind", [["--noisem", "1"], ["--noisem", "1", "--amp"], ["--noisem", "inf"]])
def test_a_generator_update_reads_nothing_back_from_the_device(dirs, monkeypatch, kind):
    """A value read back from a GPU (.item(), bool(), .tolist(), .cpu(), ...) makes the host wait for it: the loop
    reads its sums only for the progress bar, every run_gan.PROGRESS_EVERY updates. On a CPU every such read is
    counted here; the Poisson sampler, which draws on the CPU by design, draws its batches before."""
    bench_gan_update.write_random_patches(64, 96)
    trial, args = bench_gan_update.start_trial(["t", *kind, *bench_gan_update.model_flags(4, 4, 8, 2, "cpu", "bk")])
    run_gan.generator_update(trial, args)  # warm-up
    trial.indices = iter([next(trial.indices) for _ in range(3 * args.n_discr)])
    reads = []
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name), reads))
        for _ in range(3):
            run_gan.generator_update(trial, args)
    assert reads == [] and trial.generator_updates == 4
