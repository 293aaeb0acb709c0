"""Training smoke tests on tiny synthetic data: learning, exact resume, fine-tuning, variants."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medflowad.config import ConfigError, RunConfig, config_from_dict
from medflowad.flows import Glow, GlowConfig
from medflowad.storage import load_model
from medflowad.training import TrainingError, train
from medflowad.training import trainer as trainer_module
from medflowad.training.trainer import _Objective


def tiny_config(train_spec: Path, test_spec: Path | None = None, **overrides) -> RunConfig:
    values = {
        "model": {"in_channels": 3, "image_size": [8, 8], "levels": 2, "steps": 2, "hidden": 16},
        "data": {"train": str(train_spec), "test": str(test_spec) if test_spec else None,
                 "translate": 0.0, "hflip": True, "test_limit": 0},
        "optim": {"lr": 2e-3, "warmup_steps": 5, "batch_size": 32, "steps": 20},
        "checkpoint_every": 5, "eval_every": 10, "device": "cpu",
    }
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(values)


def test_training_lowers_test_bits_per_dim(tmp_path, blobs_npz, blobs_test_npz):
    config = tiny_config(blobs_npz, blobs_test_npz, optim__steps=80, eval_every=20)
    result = train(config, tmp_path / "run", show_progress=False)
    bpds = [h["test_bpd"] for h in result.history]
    assert len(bpds) == 4
    assert bpds[-1] < bpds[0] - 0.2, bpds
    run = tmp_path / "run"
    for name in ("model.safetensors", "config.yaml", "metrics.json", "train.log", "checkpoint.safetensors"):
        assert (run / name).exists(), name
    model, cfg = load_model(run)
    assert cfg.model == config.model
    assert not model.training


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, blobs_npz):
    config = tiny_config(blobs_npz, optim__steps=12, checkpoint_every=4)
    train(config, tmp_path / "straight", show_progress=False)
    # Interrupted after 6 steps (checkpoint written at stop), then resumed in a fresh call.
    partial = train(config, tmp_path / "resumed", show_progress=False, stop_after=6)
    assert partial.steps == 6
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    train(config, tmp_path / "resumed", show_progress=False)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_channels_last_trains_to_the_same_weights(tmp_path, blobs_npz):
    """The NHWC layout changes speed only: same weights to float precision, and loaded models use it."""
    plain = tiny_config(blobs_npz, optim__steps=8)
    nhwc = tiny_config(blobs_npz, optim__steps=8, channels_last=True)
    train(plain, tmp_path / "plain", show_progress=False)
    train(nhwc, tmp_path / "nhwc", show_progress=False)
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "nhwc" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    model, cfg = load_model(tmp_path / "nhwc")
    assert cfg.channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        assert torch.allclose(model(x).log_prob, load_model(tmp_path / "plain")[0](x).log_prob, rtol=1e-4)


def test_resume_refuses_a_different_run(tmp_path, blobs_npz):
    config = tiny_config(blobs_npz, optim__steps=6)
    train(config, tmp_path / "run", show_progress=False, stop_after=2)
    changed = tiny_config(blobs_npz, optim__steps=6, optim__lr=1e-4)
    with pytest.raises(TrainingError, match=r"optim\.lr"):
        train(changed, tmp_path / "run", show_progress=False)


def _spoil_losses(monkeypatch, calls: tuple[int, ...], spoil) -> None:
    """The step loss of the given calls (1-based) becomes ``spoil(objective, loss)``."""
    original = trainer_module._Objective.__call__
    count = {"n": 0}

    def spoiled(self, *args):
        loss, parts = original(self, *args)
        count["n"] += 1
        return (spoil(self, loss) if count["n"] in calls else loss), parts

    monkeypatch.setattr(trainer_module._Objective, "__call__", spoiled)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, blobs_npz, monkeypatch):
    _spoil_losses(monkeypatch, (3, 4), lambda objective, loss: loss * float("nan"))
    result = train(tiny_config(blobs_npz, optim__steps=8), tmp_path / "run", show_progress=False)
    assert result.skipped_steps == 2
    assert "skipped" in (tmp_path / "run" / "train.log").read_text()
    model, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_stops_with_clear_error(tmp_path, blobs_npz, monkeypatch):
    original = trainer_module._Objective.__call__
    monkeypatch.setattr(trainer_module, "MAX_CONSECUTIVE_SKIPS", 3)
    monkeypatch.setattr(trainer_module._Objective, "__call__",
                        lambda self, *a: (original(self, *a)[0] * float("inf"), {}))
    with pytest.raises(TrainingError, match="diverged"):
        train(tiny_config(blobs_npz, optim__steps=8), tmp_path / "run", show_progress=False)


def test_fine_tune_and_outlier_loss(tmp_path, blobs_npz, stripes_npz, blobs_test_npz):
    general_dir = tmp_path / "general"
    train(tiny_config(stripes_npz, optim__steps=10), general_dir, show_progress=False)
    config = tiny_config(
        blobs_npz, blobs_test_npz, optim__steps=10, init_from=str(general_dir),
        general_model=str(general_dir), data__general=str(stripes_npz),
        outlier__enabled=True, outlier__batch_size=16,
    )
    result = train(config, tmp_path / "outlier", show_progress=False)
    assert result.history and "outlier" in result.history[-1]
    # Fine-tuning really started from the general weights: with lr 0 the weights stay identical.
    frozen = tiny_config(blobs_npz, optim__steps=2, optim__lr=0.0, optim__weight_decay=0.0,
                         init_from=str(general_dir))
    train(frozen, tmp_path / "lr0", show_progress=False)
    a = load_file(general_dir / "model.safetensors")
    b = load_file(tmp_path / "lr0" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_margin_outlier_variant_needs_no_general_model(tmp_path, blobs_npz, stripes_npz):
    config = tiny_config(blobs_npz, optim__steps=4, data__general=str(stripes_npz), outlier__enabled=True,
                         outlier__kind="margin", outlier__margin=5.0, outlier__weight=1.0)
    assert train(config, tmp_path / "margin", show_progress=False).steps == 4


def _fixed_batch() -> tuple[Glow, Glow, torch.Tensor, torch.Tensor]:
    from tests.flows.test_glow import _trained_looking_glow

    glow = GlowConfig(in_channels=3, image_size=(8, 8), levels=2, steps=2, hidden=16)
    torch.manual_seed(11)
    return (_trained_looking_glow(glow, seed=1), _trained_looking_glow(glow, seed=2),
            torch.rand(3, 3, 8, 8) - 0.5, torch.rand(3, 3, 8, 8) - 0.5)


@pytest.mark.parametrize("kind", ["bce", "margin"])
def test_outlier_step_loss_matches_a_hand_computation(kind):
    """Step loss = mean NLL in bits/dim + w * term / (D ln 2), the term by METHOD.md's formula in plain Python:
    bce: mean softplus((log p_in(x_g) - log p_g(x_g)) / T); margin: mean relu(m - log p_in(x) + log p_in(x_g))."""
    in_model, general, x, x_general = _fixed_batch()
    config = tiny_config("unused.npz", outlier__enabled=True, outlier__kind=kind, outlier__weight=3.0,
                         data__general="unused_general.npz",
                         outlier__temperature=7.0, outlier__margin=40.0,
                         general_model="g" if kind == "bce" else None)
    loss, parts = _Objective(in_model, general if kind == "bce" else None, config)(x, None, x_general)
    with torch.no_grad():
        lp_in, lp_in_g, lp_g_g = (in_model(x).log_prob.tolist(), in_model(x_general).log_prob.tolist(),
                                  general(x_general).log_prob.tolist())
    d = 3 * 8 * 8
    nll_bpd = sum((-v + d * math.log(256)) / (d * math.log(2)) for v in lp_in) / 3
    if kind == "bce":
        term = sum(math.log1p(math.exp((a - b) / 7.0)) for a, b in zip(lp_in_g, lp_g_g, strict=True)) / 3
    else:
        term = sum(max(0.0, 40.0 - a + b) for a, b in zip(lp_in, lp_in_g, strict=True)) / 3
    assert parts["outlier"] == pytest.approx(term, rel=1e-4)
    assert loss.item() == pytest.approx(nll_bpd + 3.0 * term / (d * math.log(2)), rel=1e-5)


def test_per_location_outlier_step_loss_matches_a_hand_computation():
    """The per-location term in plain Python from each scale's maps: z_1 holds half of the 3x8x8 image's
    dimensions (6 channels at 4x4 locations), z_2 the rest (24 channels at 2x2), METHOD.md's layout."""
    in_model, general, x, x_general = _fixed_batch()
    config = tiny_config("unused.npz", outlier__enabled=True, outlier__weight=3.0, outlier__temperature=7.0,
                         outlier__per_location=True, data__general="unused_general.npz", general_model="g")
    loss, parts = _Objective(in_model, general, config)(x, None, x_general)
    with torch.no_grad():
        maps_in = [m.tolist() for m in in_model(x_general).contribution_maps]
        maps_g = [m.tolist() for m in general(x_general).contribution_maps]
        lp_in = in_model(x).log_prob.tolist()
    d = 3 * 8 * 8
    term = 0.0
    for scale, channels in enumerate([6, 24]):
        temperature = 7.0 * channels / d
        for image in range(3):
            for row_in, row_g in zip(maps_in[scale][image], maps_g[scale][image], strict=True):
                for a, b in zip(row_in, row_g, strict=True):
                    term += channels / d * math.log1p(math.exp((a - b) / temperature)) / 3
    nll_bpd = sum((-v + d * math.log(256)) / (d * math.log(2)) for v in lp_in) / 3
    assert parts["outlier"] == pytest.approx(term, rel=1e-4)
    assert loss.item() == pytest.approx(nll_bpd + 3.0 * term / (d * math.log(2)), rel=1e-5)


def test_supervised_variant(tmp_path, blobs_npz, stripes_npz):
    general_dir = tmp_path / "general"
    train(tiny_config(stripes_npz, optim__steps=4), general_dir, show_progress=False)
    config = tiny_config(blobs_npz, optim__steps=6, supervised=True, model__num_classes=2,
                         general_model=str(general_dir), data__general=str(stripes_npz),
                         outlier__enabled=True, outlier__batch_size=8, eval_every=6,
                         data__test=str(blobs_npz))
    result = train(config, tmp_path / "sup", show_progress=False)
    assert {"class_bce", "outlier"} <= set(result.history[-1])
    model, _ = load_model(tmp_path / "sup")
    assert model.priors[0].mean.shape[0] == 2


def test_config_errors_are_specific(blobs_npz):
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="general_model"):
        tiny_config(blobs_npz, outlier__enabled=True, data__general=str(blobs_npz))
    with pytest.raises(ConfigError, match="expected float"):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="per_location needs kind bce"):
        tiny_config(blobs_npz, outlier__enabled=True, outlier__kind="margin", outlier__per_location=True,
                    data__general=str(blobs_npz))


def test_atomic_write_leaves_no_partial_file_and_normal_permissions(tmp_path):
    import os

    from medflowad.storage import atomic_write, write_text

    target = tmp_path / "out.txt"
    write_text(target, "old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_finished_run_returns_without_loading_data(tmp_path, blobs_npz):
    config = tiny_config(blobs_npz, optim__steps=4, eval_every=2)
    first = train(config, tmp_path / "run", show_progress=False)
    blobs_npz.unlink()  # a finished run must not need its data again
    again = train(config, tmp_path / "run", show_progress=False)
    assert (again.steps, again.skipped_steps, again.history) == (first.steps, first.skipped_steps, first.history)


def test_likelihood_masks_shift_and_flip_with_their_images(tmp_path, monkeypatch):
    """A slice set with masks trains with the masked likelihood; each mask is augmented with its own image."""
    from medflowad.data.slice_sets import save_slice_set

    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(64, 1, 8, 8, generator=gen) > 0.3).to(torch.uint8)
    save_slice_set(tmp_path / "set", masks * 255, torch.zeros(64, dtype=torch.long), {"sources": []}, masks=masks)
    seen = []
    original = trainer_module._Objective.__call__

    def spy(self, x, labels, x_general, mask=None):
        seen.append((x.detach().clone(), mask.clone()))
        return original(self, x, labels, x_general, mask)

    monkeypatch.setattr(trainer_module._Objective, "__call__", spy)
    config = tiny_config(tmp_path / "set", model__in_channels=1, data__translate=0.25, optim__steps=3)
    result = train(config, tmp_path / "run", show_progress=False)
    assert result.steps == 3 and len(seen) == 3
    for x, mask in seen:
        assert torch.equal(x > 0, mask.bool())  # image 255 where the mask is 1, shifted and flipped alike


def _recording_optimizer(monkeypatch) -> list[dict]:
    """Records, at every optimiser step, the learning rate and the global norm of the gradients it applies."""
    seen: list[dict] = []
    make = trainer_module._make_optimizer

    def recording(model, config):
        optimizer = make(model, config)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            seen.append({"lr": optimizer.param_groups[0]["lr"],
                         "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))})
            return step(*args, **kwargs)

        optimizer.step = recorded_step
        return optimizer

    monkeypatch.setattr(trainer_module, "_make_optimizer", recording)
    return seen


def test_gradient_clipping_bounds_the_applied_gradient(tmp_path, blobs_npz, monkeypatch):
    seen = _recording_optimizer(monkeypatch)
    train(tiny_config(blobs_npz, optim__steps=6, optim__max_grad_norm=1e9), tmp_path / "free", show_progress=False)
    raw = [s["grad_norm"] for s in seen]
    seen.clear()
    limit = min(raw) / 4  # every step's raw gradient is at least 4x over it
    train(tiny_config(blobs_npz, optim__steps=6, optim__max_grad_norm=limit), tmp_path / "clipped",
          show_progress=False)
    assert len(seen) == 6 and all(s["grad_norm"] <= limit * (1 + 1e-5) for s in seen)
    assert seen[0]["grad_norm"] == pytest.approx(limit, rel=1e-5)  # same first batch: scaled down to the limit


def test_warm_up_follows_its_schedule(tmp_path, blobs_npz, monkeypatch):
    """lr(s) = lr * min(1, (s + 1) / warmup) for steps s = 0, 1, ... (METHOD.md's linear warm-up)."""
    seen = _recording_optimizer(monkeypatch)
    train(tiny_config(blobs_npz, optim__steps=8, optim__lr=2e-3, optim__warmup_steps=4), tmp_path / "run",
          show_progress=False)
    assert [s["lr"] for s in seen] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3])


def test_non_finite_gradient_with_finite_loss_is_skipped_and_counted(tmp_path, blobs_npz, monkeypatch):
    """sqrt(|p - p|) is 0 with a NaN gradient: the loss stays finite, the step must still be skipped."""

    def nan_gradient(objective, loss):
        p = next(objective.model.parameters())
        return loss + torch.sqrt((p - p.detach()).abs()).sum()

    _spoil_losses(monkeypatch, (2, 5), nan_gradient)
    result = train(tiny_config(blobs_npz, optim__steps=8), tmp_path / "run", show_progress=False)
    assert result.skipped_steps == 2
    model, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_finished_run_given_more_steps_continues_exactly(tmp_path, blobs_npz):
    train(tiny_config(blobs_npz, optim__steps=12), tmp_path / "straight", show_progress=False)
    train(tiny_config(blobs_npz, optim__steps=6), tmp_path / "extended", show_progress=False)
    assert (tmp_path / "extended" / "model.safetensors").exists()
    result = train(tiny_config(blobs_npz, optim__steps=12), tmp_path / "extended", show_progress=False)
    assert result.steps == 12
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "extended" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bfloat16_coupling_training_learns_and_evaluates_in_float32(tmp_path, blobs_npz, blobs_test_npz,
                                                                   monkeypatch):
    """train_precision bfloat16: training steps run the coupling networks under bfloat16 autocast (seen by the
    layers during steps, never during evaluation), test bits/dim fall as in float32 and land near the float32
    run's; a typo in the setting is refused."""
    from medflowad.flows.coupling import AffineCoupling, run_network

    seen = []

    def spy(net, x_a, dtype):
        seen.append((torch.is_grad_enabled(), dtype))
        return run_network(net, x_a, dtype)

    monkeypatch.setattr("medflowad.flows.coupling.run_network", spy)
    fast = tiny_config(blobs_npz, blobs_test_npz, optim__steps=60, eval_every=30, train_precision="bfloat16")
    result = train(fast, tmp_path / "bf16", show_progress=False)
    assert {dtype for grad, dtype in seen if grad} == {torch.bfloat16}
    assert {dtype for grad, dtype in seen if not grad} == {None}  # evaluation: float32
    plain = train(tiny_config(blobs_npz, blobs_test_npz, optim__steps=60, eval_every=30), tmp_path / "fp32",
                  show_progress=False)
    fast_bpd, plain_bpd = result.history[-1]["test_bpd"], plain.history[-1]["test_bpd"]
    assert fast_bpd < result.history[0]["test_bpd"] and abs(fast_bpd - plain_bpd) < 0.1, (fast_bpd, plain_bpd)
    model, cfg = load_model(tmp_path / "bf16")
    assert cfg.train_precision == "bfloat16"
    assert all(m.network_dtype is None for m in model.modules() if isinstance(m, AffineCoupling))
    with pytest.raises(ConfigError, match="train_precision must be one of float32, bfloat16"):
        tiny_config(blobs_npz, train_precision="float16")


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_device_without_native_bfloat16_is_pointed_out(tmp_path, blobs_npz, blobs_test_npz,
                                                                     monkeypatch, caplog, native):
    """Where the device does not multiply bfloat16 natively, train_precision bfloat16 emulates it and slows
    training down: the run says so (and only then)."""
    monkeypatch.setattr("medflowad.training.trainer.native_bfloat16", lambda device: native)
    with caplog.at_level("WARNING", logger="medflowad.train"):
        train(tiny_config(blobs_npz, blobs_test_npz, optim__steps=2, eval_every=2, train_precision="bfloat16"),
              tmp_path / "run", show_progress=False)
    pointed_out = [r for r in caplog.records if "does not multiply it natively" in r.getMessage()]
    assert len(pointed_out) == (0 if native else 1)
    assert native or "train_precision: float32" in pointed_out[0].getMessage()
