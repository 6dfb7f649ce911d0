"""demo.py's plan: the private GAN starts from a GAN of public phantoms (other patients) and trains on the patches."""

import importlib
import math

import config


def load_demo(monkeypatch, dirs):
    # demo.py sets default folders in the environment at import; keep them out of the other tests' subprocesses
    for key, value in (("DPGAN_DATA_DIR", dirs[0]), ("DPGAN_WORK_DIR", dirs[1])):
        monkeypatch.setenv(key, str(value))
    return importlib.import_module("demo")


def steps(stages):
    return [(i, step) for i, stage in enumerate(stages) for step in stage]


def test_private_gan_trains_the_patches_from_the_checkpoint_of_a_gan_on_other_patients(monkeypatch, dirs):
    demo = load_demo(monkeypatch, dirs)
    stages = demo.demo_stages(0.61)
    gans = {step.args[2]: (i, step) for i, step in steps(stages) if step.args[0] == "run_gan.py"}
    private, public = gans[f"{config.PRESET}_private"], gans[demo.PUBLIC_TRIAL]
    assert public[0] < private[0]  # the public GAN has finished before the private one starts
    args = private[1].args
    assert args[args.index("--noisem") + 1] == "0.61" and args[args.index("--epochs") + 1] == str(demo.PRIVATE_EPOCHS)
    start = args[args.index("--init_from") + 1]
    assert start == str(dirs[1] / "public" / "models" / f"WGAN_{demo.PUBLIC_TRIAL}" / f"epoch_{config.EPOCHS - 1}.pth")
    assert private[1].env is None  # DP training reads the demo's training patches
    public_args = public[1].args
    assert public[1].env == demo.public_env() and math.isinf(float(public_args[public_args.index("--noisem") + 1]))
    assert public[1].env["DPGAN_DATA_DIR"] != str(config.DATA_DIR)
    phantoms = [step for _, step in steps(stages) if step.args[0] == "make_phantoms.py"]
    own, other = phantoms
    assert own.env is None and other.env == demo.public_env()
    assert other.args[other.args.index("--seed") + 1] == str(config.PHANTOM_SEED + 1)  # other patients
    assert other.args[other.args.index("--splits") + 1] == "train"


def test_the_non_private_reference_has_the_private_gans_start_and_updates(monkeypatch, dirs):
    """The rows compare privacy: the non-private GAN starts from the same public GAN and trains as many epochs of
    the same training patches at the same batch; the noise differs, and the reference's critic learns at
    config.REFERENCE_LRD (the private critic's pace) while the private GAN keeps the preset's LRD."""
    import run_gan

    demo = load_demo(monkeypatch, dirs)
    monkeypatch.setattr(config, "REFERENCE_LRD", 2e-5)
    gans = {step.args[2]: (i, step) for i, step in steps(demo.demo_stages(0.61)) if step.args[0] == "run_gan.py"}
    (i_np, nonprivate), (_, private) = gans[f"{config.PRESET}_nonprivate"], gans[f"{config.PRESET}_private"]
    assert i_np > gans[demo.PUBLIC_TRIAL][0]
    flag = lambda step, name: step.args[step.args.index(name) + 1]  # noqa: E731
    assert flag(nonprivate, "--init_from") == flag(private, "--init_from")
    assert flag(nonprivate, "--epochs") == flag(private, "--epochs")
    assert flag(nonprivate, "--batch_size") == flag(private, "--batch_size") == str(demo.FINETUNE_BATCH)
    assert math.isinf(float(flag(nonprivate, "--noisem"))) and nonprivate.env is None
    assert run_gan.parse_args(nonprivate.args[1:]).lrd == 2e-5
    assert run_gan.parse_args(private.args[1:]).lrd == config.LRD != 2e-5
    monkeypatch.setattr(config, "REFERENCE_LRD", None)  # a preset without one: both critics at LRD
    gans = {step.args[2]: step for _, step in steps(demo.demo_stages(0.61)) if step.args[0] == "run_gan.py"}
    assert run_gan.parse_args(gans[f"{config.PRESET}_nonprivate"].args[1:]).lrd == config.LRD


def test_every_point_of_the_curve_trains_from_the_public_gan_with_the_demos_recipe(monkeypatch, dirs):
    """make curve (demo.py --curve): the public GAN first, then sweep.py's jobs, the non-private one included, each
    from its checkpoint with the demo's epochs and batch on the patients."""
    import sweep
    from utils.sweep import steps as job_steps

    demo = load_demo(monkeypatch, dirs)
    stages = demo.curve_stages(2)
    runs = [(i, step) for i, step in steps(stages) if step.args[0] in ("run_gan.py", "sweep.py")]
    (i_public, public), (i_sweep, sweep_step) = runs
    assert public.args[2] == demo.PUBLIC_TRIAL and public.env == demo.public_env() and i_public < i_sweep
    args, gan_flags = sweep.parse_args(sweep_step.args[1:])
    assert args.executor == "local" and args.max_parallel == 2 and args.epochs == demo.PRIVATE_EPOCHS
    assert args.noisem == list(config.NOISE_MULTIPLIERS) and args.seeds == list(config.GAN_SEEDS)
    for noisem in (math.inf, 0.5):
        gan = job_steps("t", noisem, 12, args.epochs, gan_flags, 0.5)[0][1]
        flag = lambda name, argv=gan: argv[argv.index(name) + 1]  # noqa: E731
        assert flag("--init_from") == str(demo.public_start()) == str(
            dirs[1] / "public" / "models" / f"WGAN_{demo.PUBLIC_TRIAL}" / f"epoch_{config.EPOCHS - 1}.pth")
        assert flag("--batch_size") == str(demo.FINETUNE_BATCH) and flag("--epochs") == str(demo.PRIVATE_EPOCHS)
    assert steps(stages)[-1][1].args == ["compare_results.py"]


def test_a_stage_whose_steps_are_all_done_is_reused_not_run(monkeypatch, dirs, capsys):
    """Running make demo (or make curve) again: what exists is reused, and a stage with nothing left runs nothing."""
    demo = load_demo(monkeypatch, dirs)
    ran = []
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(demo.subprocess, "Popen", lambda *a, **k: ran.append(a))
    done = [demo.Step("a", ["x.py"], lambda: True), demo.Step("b", ["y.py"], lambda: True)]
    demo.run_stage(1, 2, done[:1])
    demo.run_stage(1, 2, done)
    assert ran == [] and capsys.readouterr().out.count("done already, reused") == 3
