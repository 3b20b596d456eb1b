import json
import math
import re

import pytest
import torch

from unet.cli import train as cli_train
from unet.training import trainer as training
from unet.checkpoint import load_checkpoint
from unet.cli.commands import train as train_cli
from unet.errors import UserError

TINY = ["--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "64", "--batch-size", "4",
        "--workers", "0", "--no-progress", "--log-every", "2", "--no-tensorboard"]


def run(tmp_path, *extra, name="run"):
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / name), *extra])
    return cli_train.main(args)


def weights(path):
    return load_checkpoint(path)["model"]


def test_train_without_data_dir_uses_synthetic_data_and_writes_the_run(tmp_path, capsys):
    summary = run(tmp_path, "--max-steps", "6", "--fold", "0", "--evaluate-every", "3", "--save-every", "3")
    out = capsys.readouterr().out
    assert "built-in synthetic EM set: 24 training / 6 validation slices" in out
    d = tmp_path / "run"
    assert sorted(p.name for p in d.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl",
                                                   "summary.json"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and 0 <= val[-1]["val"]["dice_nvidia"] <= 1
    assert summary["steps"] == 6 and summary["final_validation"] == val[-1]["val"]
    assert json.loads((d / "summary.json").read_text())["best_dice_nvidia"] == max(
        r["val"]["dice_nvidia"] for r in val)
    ckpt = load_checkpoint(d / "last.pt")
    assert ckpt["step"] == 6 and ckpt["args"]["fold"] == 0 and ckpt["model_config"]["base_filters"] == 4
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    common = ("--max-steps", "6", "--save-every", "3", "--dropout", "0.5")
    run(tmp_path, *common, name="straight")
    # Same run, stopped after 3 steps, then resumed for the other 3.
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / "split"), *common])
    args.max_steps = 3
    cli_train.main(args)
    with pytest.raises(UserError, match="holds a different run"):
        run(tmp_path, "--max-steps", "6", "--save-every", "3", "--dropout", "0.2", name="split")
    run(tmp_path, *common, "--resume", name="split")
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]  # continues the log (3 was the first part's last step), no duplicates


# The "args" keys of a checkpoint written before RunConfig (b508466): dict(vars(args)) + world_size, in order.
PRE_RUNCONFIG_ARGS = ("data_dir", "fold", "folds", "fold_scheme", "augment", "workers", "base_filters", "depth",
                      "padding", "batch_norm", "dropout", "input_size", "batch_size", "learning_rate",
                      "weight_decay", "max_steps", "clip_grad", "seed", "compile", "model_dir", "evaluate_every",
                      "log_every", "save_every", "resume", "overwrite", "no_progress", "benchmark", "warmup_steps",
                      "peak_tflops", "device", "amp", "amp_dtype", "tile_size", "tile_batch", "overlap", "blend",
                      "tta", "world_size")


# Flags added since, stored after world_size (checkpoints without them resume with their defaults).
NEW_ARGS = ("loss", "compile_mode", "lr_schedule", "lr_warmup_steps", "augment_level", "train_images",
            "train_labels", "val_images", "val_labels", "val_slices", "label_kind", "num_classes", "ignore_label",
            "init_from", "freeze_encoder_steps", "tensorboard", "memory_format", "scale", "channel", "time",
            "host_allocator")


def test_run_config_holds_every_flag_and_is_frozen():
    args = cli_train.get_args_parser().parse_args(["--padding", "valid"])
    config = cli_train.run_config(args).resolved(world_size=2, amp_dtype=None)
    assert tuple(config.as_dict()) == PRE_RUNCONFIG_ARGS + NEW_ARGS
    assert set(config.as_dict()) == {*vars(args), "world_size"}
    assert config.input_size == 572 and config.world_size == 2 and args.input_size is None  # args left alone
    with pytest.raises(AttributeError):
        config.max_steps = 1


def test_checkpoint_written_before_run_config_resumes_bit_identically(tmp_path):
    common = ("--max-steps", "6", "--save-every", "3", "--fold", "0", "--evaluate-every", "3")
    straight = run(tmp_path, *common, name="straight")
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / "old"), *common])
    args.max_steps = 3
    cli_train.main(args)
    # Rewrite last.pt the way the old trainer stored it: the edited Namespace as a dict, the best score as best_dice.
    path = tmp_path / "old" / "last.pt"
    ckpt = load_checkpoint(path)
    # (in the old order: --seed has since moved to the data group, which moved it in vars(args))
    flat = {k: v for k, v in {**vars(args), "world_size": 1, "amp_dtype": None}.items() if k not in NEW_ARGS}
    assert set(flat) == set(PRE_RUNCONFIG_ARGS)  # and no "loss": it resumes as the ce_dice run it was
    old_args = {k: flat[k] for k in PRE_RUNCONFIG_ARGS}
    old_args["compile"] = False  # a store_true flag then
    old_args["learning_rate"] = 1e-4  # a plain default then (now None until resolved by --init-from)
    ckpt["args"], ckpt["best_dice"] = old_args, ckpt.pop("best_dice_nvidia")
    torch.save(ckpt, path)
    resumed = run(tmp_path, *common, "--resume", name="old")
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best_dice_nvidia"] == straight["best_dice_nvidia"] and resumed["best_step"] == straight["best_step"]


def test_model_dir_guards(tmp_path, capsys):
    with pytest.raises(UserError, match="--resume: there is no .*last.pt to resume from"):
        run(tmp_path, "--max-steps", "2", "--resume")
    run(tmp_path, "--max-steps", "2")
    first = weights(tmp_path / "run" / "last.pt")
    run(tmp_path, "--max-steps", "2")  # finished, same args: nothing is redone or overwritten
    assert "holds a finished run (2 steps); nothing to do" in capsys.readouterr().out
    assert all(torch.equal(first[k], v) for k, v in weights(tmp_path / "run" / "last.pt").items())
    run(tmp_path, "--max-steps", "2", "--overwrite", "--seed", "5")
    assert not all(torch.equal(first[k], v) for k, v in weights(tmp_path / "run" / "last.pt").items())


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = training.ce_dice_loss

    def poisoned(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(training, "ce_dice_loss", poisoned)
    with pytest.raises(training.TrainingDiverged, match=r"non-finite at step 4; stopped, keeping the last good "
                                                        r"checkpoint .*last.pt \(step 3\)"):
        run(tmp_path, "--max-steps", "10", "--save-every", "1", "--log-every", "1")
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_logged_loss_is_the_mean_of_the_finite_losses_when_fp16_skips_a_step(tmp_path, monkeypatch):
    losses = []
    real = training.ce_dice_loss

    def overflow_at_step_2(logits, target):
        loss = real(logits, target)
        loss = loss * float("inf") if len(losses) == 1 else loss  # the fp16 scaler skips this step
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(training, "ce_dice_loss", overflow_at_step_2)
    run(tmp_path, "--max-steps", "4", "--log-every", "4", "--amp", "--amp-dtype", "fp16")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    finite = [x for x in losses if math.isfinite(x)]
    assert len(losses) == 4 and len(finite) == 3
    assert [r["loss"] for r in records if r["kind"] == "train"] == [pytest.approx(sum(finite) / 3, rel=1e-6)]


def test_amp_fp16_order_scale_backward_unscale_clip_step_update(tmp_path, monkeypatch):
    order = []

    class RecordingScaler(torch.amp.GradScaler):
        def scale(self, outputs):
            order.append("scale")
            scaled = super().scale(outputs)
            scaled.register_hook(lambda g: order.append("backward"))
            return scaled

        def unscale_(self, optimizer):
            order.append("unscale")
            return super().unscale_(optimizer)

        def step(self, optimizer, *a, **k):
            order.append("step")
            return super().step(optimizer, *a, **k)

        def update(self, *a, **k):
            order.append("update")
            return super().update(*a, **k)

    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(training.DeviceSetup, "grad_scaler",
                        lambda self: RecordingScaler(self.type, enabled=True))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: (order.append("clip"), real_clip(*a, **k))[1])
    run(tmp_path, "--max-steps", "2", "--amp", "--amp-dtype", "fp16", "--clip-grad", "1.0")
    assert order == ["scale", "backward", "unscale", "clip", "step", "update"] * 2
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["args"]["amp_dtype"] == "fp16" and ckpt["scaler"]["scale"] > 0


def test_bf16_amp_trains_on_cpu(tmp_path):
    summary = run(tmp_path, "--max-steps", "4", "--amp")
    assert summary["amp"] == "bf16"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    torch.manual_seed(0)
    initial = training.UNet(training.ModelConfig(base_filters=4, depth=3, padding="same")).state_dict()
    trained = weights(tmp_path / "run" / "last.pt")
    assert trained.keys() == initial.keys() and any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert all(v.dtype == torch.float32 for v in trained.values())  # autocast never lowers the master weights


def test_benchmark_mode_reports_throughput_and_mfu_without_checkpoints(tmp_path):
    result = run(tmp_path, "--benchmark", "--max-steps", "2", "--warmup-steps", "1")
    assert result["images_per_s"] > 0 and result["gflop_per_image"] > 0 and 0 < result["mfu"] < 1
    assert result["peak_source"].startswith("measured")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["benchmark.json"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli(TINY + ["--model-dir", str(tmp_path / "x"), "--input-size", "65"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--input-size: input size 65 is not valid" in err
    with pytest.raises(SystemExit):
        train_cli(TINY + ["--model-dir", str(tmp_path / "x"), "--fold", "7"])
    assert "fold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli(TINY + ["--model-dir", str(tmp_path / "x"), "--batch-size", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --batch-size/--batch_size: must be at least 1, got 0")


def test_help_lists_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit):
        train_cli(["--help"])
    out = capsys.readouterr().out
    for flag in ("--data-dir", "--model-dir", "--batch-size", "--learning-rate", "--max-steps", "--weight-decay",
                 "--fold", "--folds", "--fold-scheme", "--seed", "--amp", "--amp-dtype", "--augment", "--workers",
                 "--device", "--base-filters", "--padding", "--evaluate-every", "--log-every", "--resume",
                 "--benchmark", "--warmup-steps", "--compile", "--save-every"):
        assert flag in out, flag
    assert "(default: 6400)" in out and "(default: 0.0005)" in out
    # NVIDIA's underscore spellings are accepted too.
    args = cli_train.get_args_parser().parse_args(["--batch_size", "2", "--max_steps", "3", "--model_dir", "m"])
    assert (args.batch_size, args.max_steps, args.model_dir) == (2, 3, "m")


@pytest.mark.slow
def test_compile_flag_trains(tmp_path):
    summary = run(tmp_path, "--max-steps", "2", "--compile")
    assert summary["steps"] == 2 and torch.isfinite(
        torch.tensor(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]))


def test_compile_switch_auto_is_eager_on_cpu_and_flags_override():
    parse = cli_train.get_args_parser().parse_args
    assert parse([]).compile is None  # auto: the device decides
    for flags, device_default, expected in [([], False, False), ([], True, True), (["--no-compile"], True, False),
                                            (["--compile"], False, True)]:
        config = cli_train.run_config(parse(flags)).resolved(world_size=1, amp_dtype=None,
                                              compile_default=device_default)
        assert config.compile is expected, (flags, device_default)


def test_auto_compile_compiles_model_and_loss_as_one_function_when_the_device_says_so(tmp_path, monkeypatch, capsys):
    summary = run(tmp_path, "--max-steps", "1", name="cpu")
    assert summary["compile"] is False and summary["first_step_s"] > 0  # auto on CPU: eager
    # A device that compiles by default (CUDA), mocked: torch.compile is recorded, not run.
    compiled = []
    monkeypatch.setattr(training.DeviceSetup, "compile_by_default", property(lambda self: True))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (compiled.append((fn, kw)), fn)[1])
    summary = run(tmp_path, "--max-steps", "1", name="cuda_like")
    assert summary["compile"] is True and summary["compile_mode"] == "default"
    assert len(compiled) == 1 and compiled[0][1] == {"mode": "default"}
    assert compiled[0][0].__name__ == "forward_loss"  # the whole forward + loss, not the model alone
    assert load_checkpoint(tmp_path / "cuda_like" / "last.pt")["args"]["compile"] is True
    # the compile time and the cache folder are reported
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run(tmp_path, "--max-steps", "1", "--overwrite", name="cuda_like")
    assert re.search(r"compile: first step [\d.]+ s \(torch.compile, mode default; kernels cached across runs in "
                     + re.escape(str(tmp_path / "inductor")), capsys.readouterr().out)


@pytest.mark.slow  # two training runs
def test_weighted_ce_loss_trains_with_travelling_weight_maps_and_resumes(tmp_path, monkeypatch):
    common = ("--max-steps", "4", "--save-every", "2", "--loss", "weighted_ce")
    seen = []
    real = training.weighted_cross_entropy

    def recording(logits, target, weights):
        seen.append((weights.shape, target.dtype, float(weights.min()), float(weights.max())))
        return real(logits, target, weights)
    monkeypatch.setattr(training, "weighted_cross_entropy", recording)
    straight = run(tmp_path, *common, name="straight")
    assert straight["loss"] == "weighted_ce" and len(seen) == 4
    # 4 crops of 64x64 ('same'); uint8 labels; weights: class balance (> 0) plus border terms up to ~w0.
    assert all(shape == (4, 64, 64) and dtype == torch.uint8 and lo > 0 and 1 < hi < 13
               for shape, dtype, lo, hi in seen), seen
    monkeypatch.setattr(training, "weighted_cross_entropy", real)
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / "split"), *common])
    args.max_steps = 2
    cli_train.main(args)
    with pytest.raises(UserError, match=r"--loss 'weighted_ce' there vs 'ce_dice' now"):
        run(tmp_path, "--max-steps", "4", "--save-every", "2", name="split")
    run(tmp_path, *common, name="split")
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it is a different training from ce_dice's
    run(tmp_path, "--max-steps", "4", "--save-every", "2", name="ce_dice")
    c = weights(tmp_path / "ce_dice" / "last.pt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow  # three training runs
def test_cosine_schedule_with_warm_up_is_logged_and_resumes_bit_identically(tmp_path, monkeypatch):
    common = ("--max-steps", "6", "--save-every", "3", "--log-every", "1", "--learning-rate", "1e-3",
              "--lr-schedule", "cosine", "--lr-warmup-steps", "2")
    run(tmp_path, *common, name="straight")
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # warm-up 5e-4, 1e-3; then half a cosine over the 4 remaining steps, starting at the peak
    expected = [5e-4, 1e-3, 1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 5e-4, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2]
    assert [r["lr"] for r in logged if r["kind"] == "train"] == pytest.approx(expected, rel=1e-12)
    # The same run killed after step 4 (last.pt at step 3), resumed with the same flags.
    real, calls = training.Trainer.train_one, {"n": 0}

    def dies_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(training.Trainer, "train_one", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *common, name="split")
    monkeypatch.setattr(training.Trainer, "train_one", real)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 3
    with pytest.raises(UserError, match=r"--lr-schedule 'cosine' there vs 'poly' now"):
        run(tmp_path, *common[:-3], "poly", "--lr-warmup-steps", "2", "--resume", name="split")
    run(tmp_path, *common, "--resume", name="split")
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the schedule changed the training: a constant-rate run ends elsewhere
    run(tmp_path, "--max-steps", "6", "--learning-rate", "1e-3", name="constant")
    c = weights(tmp_path / "constant" / "last.pt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("flag, value, message", [
    ("--lr-warmup-steps", "-1", "--lr-warmup-steps must be 0 or more and below --max-steps 4, got -1"),
    ("--lr-warmup-steps", "4", "--lr-warmup-steps must be 0 or more and below --max-steps 4, got 4"),
])
def test_bad_warm_up_is_refused_before_anything_is_written(tmp_path, flag, value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run(tmp_path, "--max-steps", "4", flag, value)
    assert not (tmp_path / "run").exists()
