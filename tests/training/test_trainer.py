"""Training smoke tests on tiny synthetic data: learning, exact resume, fine-tuning, variants."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medflowad.config import ConfigError, RunConfig, config_from_dict
from medflowad.storage import load_model
from medflowad.training import TrainingError, train
from medflowad.training import trainer as trainer_module


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


def test_non_finite_steps_are_skipped_and_counted(tmp_path, blobs_npz, monkeypatch):
    original = trainer_module._Objective.__call__
    calls = {"n": 0}

    def sometimes_nan(self, *args):
        loss, parts = original(self, *args)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] in (3, 4) else (loss, parts)

    monkeypatch.setattr(trainer_module._Objective, "__call__", sometimes_nan)
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
    assert result.history[-1]["outlier"] >= 0
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
