"""Maximum-likelihood training of Glow, with the outlier and supervised losses of METHOD.md.

All randomness of step ``s`` (batch order, augmentation, dequantisation noise) is drawn from generators
seeded by ``(seed, s)``, so a run resumed from a checkpoint continues exactly as if uninterrupted.
Losses are optimised in bits/dim units: the outlier terms of METHOD.md (nats) are divided by D ln 2,
the same factor as the NLL, which leaves the objective unchanged up to a positive constant.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medflowad.config import ConfigError, RunConfig, config_to_dict
from medflowad.data.augment import random_hflip, random_translate
from medflowad.data.natural import DataError, ImageSet, load_image_set, split_spec
from medflowad.devices import native_bfloat16, resolve_device
from medflowad.flows.actnorm import ActNorm
from medflowad.flows.coupling import coupling_networks_in, training_dtype
from medflowad.flows.glow import Glow, class_mixture_log_prob
from medflowad.scores import likelihoods
from medflowad.storage import (
    MODEL_CONFIG,
    ModelFolderError,
    load_model,
    load_weights,
    read_tensors,
    read_yaml_mapping,
    save_model,
    write_json,
    write_tensors,
    write_yaml,
)
from medflowad.training import distributed
from medflowad.training.losses import outlier_bce, outlier_bce_per_location, outlier_margin, wrong_class_bce
from medflowad.units import bits_per_dim, to_model_input

log = logging.getLogger("medflowad.train")

CHECKPOINT = "checkpoint.safetensors"
MAX_CONSECUTIVE_SKIPS = 50
# Settings that may change between an interrupted run and its resumption: they do not change the trained
# weights (test_limit: how many test images the bits/dim report reads).
RESUMABLE_CHANGES = {("optim", "steps"), ("device",), ("checkpoint_every",), ("eval_every",), ("channels_last",),
                     ("data", "test_limit"), ("train_precision",)}
# Settings naming data or model folders: the same place named relatively or absolutely is no change.
PATH_SETTINGS = {("data", "train"), ("data", "test"), ("data", "general"), ("init_from",), ("general_model",)}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, inconsistent resume, unusable data)."""


@dataclass
class TrainData:
    train: ImageSet
    test: ImageSet | None = None
    general: ImageSet | None = None


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    skipped_steps: int
    train_bpd: float
    test_bpd: float | None
    images_per_second: float
    history: list[dict] = field(default_factory=list)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class _BatchSampler:
    """Epoch-wise shuffled batches; batch ``s`` depends only on (seed, stream, s)."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int) -> None:
        self.n, self.batch_size, self.seed, self.stream = n, min(batch_size, n), seed, stream
        self.per_epoch = max(1, n // self.batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, self.stream, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


def load_train_data(config: RunConfig) -> TrainData:
    if not config.data.train:
        raise ConfigError("no training data: set data.train in the config or pass --train-data")
    shape = dict(channels=config.model.in_channels, size=config.model.image_size)
    data = TrainData(load_image_set(config.data.train, **shape))
    if config.data.test:
        data.test = load_image_set(config.data.test, **shape).random_subset(config.data.test_limit, config.seed)
    if config.outlier.enabled:
        data.general = load_image_set(config.data.general, **shape)
    for part in (data.train, data.test, data.general):
        if part is not None and part.skipped:
            log.warning("%s: %d image file(s) could not be decoded and are left out: %s", part.source,
                        len(part.skipped), "; ".join(part.skipped))
    return data


def _make_optimizer(model: Glow, config: RunConfig) -> torch.optim.Optimizer:
    cls = torch.optim.Adamax if config.optim.optimizer == "adamax" else torch.optim.Adam
    return cls(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)


def _lr_at(step: int, config: RunConfig) -> float:
    warm = config.optim.warmup_steps
    return config.optim.lr * min(1.0, (step + 1) / warm) if warm > 0 else config.optim.lr


def _save_checkpoint(path: Path, model: Glow, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, entries in opt_state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"state": state, "param_groups": opt_state["param_groups"], "optim_scalars": scalars}
    write_tensors(path, tensors, metadata={"medflowad": json.dumps(meta)})


def _load_checkpoint(path: Path, model: Glow, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    tensors = read_tensors(path)  # a truncated or damaged file: a ModelFolderError naming it
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("medflowad", "{}"))
        if not isinstance(meta, dict) or "state" not in meta:
            raise TrainingError(f"{path}: not a medflowad checkpoint")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        for index, entries in meta["optim_scalars"].items():
            opt_state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    except TrainingError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())
        raise TrainingError(f"{path}: does not fit this run ({reason[:300]}); delete it to start the run "
                            "again") from exc
    return meta["state"]


def _check_resumable(out_dir: Path, config: RunConfig) -> None:
    stored = read_yaml_mapping(out_dir / MODEL_CONFIG)
    current = config_to_dict(config)
    differences = []
    for section, values in current.items():
        if isinstance(values, dict):
            differences += [(section, k) for k, v in values.items() if stored.get(section, {}).get(k) != v]
        elif stored.get(section) != values:
            differences.append((section,))
    differences = [d for d in differences if not (d in PATH_SETTINGS and _same_place(_setting(stored, d),
                                                                                     _setting(current, d)))]
    blocking = [".".join(d) for d in differences if d not in RESUMABLE_CHANGES]
    if blocking:
        raise TrainingError(
            f"{out_dir} holds a checkpoint of a different run (changed: {', '.join(blocking)}); "
            "choose another output folder or delete that one"
        )


def _setting(config: dict, key: tuple[str, ...]):
    return config.get(key[0], {}).get(key[1]) if len(key) == 2 else config.get(key[0])


def _same_place(a: str | None, b: str | None) -> bool:
    """Two data specs or folders (``PATH[::SUBDIR]``, environment variables allowed) naming the same place."""
    if a is None or b is None:
        return a == b
    try:
        (path_a, sub_a), (path_b, sub_b) = split_spec(a), split_spec(b)
    except DataError:  # an unset environment variable: not comparable, so not the same
        return False
    return sub_a == sub_b and path_a.resolve() == path_b.resolve()


class _Objective:
    """Computes the step loss (bits/dim units) for the configured variant."""

    def __init__(self, model: Glow, general: Glow | None, config: RunConfig) -> None:
        self.model, self.general, self.config = model, general, config
        self.num_dims = config.model.num_dims
        self.nats_to_bpd = 1.0 / (self.num_dims * math.log(2))

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None, x_general: torch.Tensor | None,
                 mask: torch.Tensor | None = None):
        cfg, out_cfg = self.config, self.config.outlier
        parts: dict[str, float] = {}
        # One forward pass per step (the general samples ride along with the in-distribution batch): DDP
        # reduces the gradients of exactly one forward pass.
        if mask is not None and labels is not None:
            out, out_g = self.model(x, labels), None  # masked, under each image's own class: no general batch
        else:
            joint = self.model(x if x_general is None else torch.cat([x, x_general]))
            out = joint.rows(slice(0, len(x)))
            out_g = joint.rows(slice(len(x), None)) if x_general is not None else None
        if mask is not None:  # healthy tissue of patients' slices: masked locations leave the likelihood
            log_p_in, dims = out.masked_log_prob(mask)
            counted = dims > 0  # an image masked everywhere has no dimension to count
            nll_bpd = bits_per_dim(log_p_in[counted], dims[counted]).mean()
        elif cfg.supervised:
            per_class = out.log_prob  # (B, K)
            log_p_in = per_class.gather(1, labels[:, None]).squeeze(1)
            nll_bpd = bits_per_dim(log_p_in, self.num_dims).mean()
        else:
            log_p_in = out.log_prob
            nll_bpd = bits_per_dim(log_p_in, self.num_dims).mean()
        loss = nll_bpd
        parts["bpd"] = nll_bpd.item()
        if cfg.supervised and self.general is not None:
            with torch.no_grad():
                log_p_g_in = self.general(x).log_prob
            negatives = wrong_class_bce(per_class, log_p_g_in, labels, out_cfg.temperature)
            loss = loss + out_cfg.weight * negatives * self.nats_to_bpd
            parts["class_bce"] = negatives.item()
        if out_g is not None:
            log_p_in_g = class_mixture_log_prob(out_g.log_prob) if cfg.supervised else out_g.log_prob
            if out_cfg.kind == "bce" and out_cfg.per_location:
                with torch.no_grad():
                    maps_g_g = self.general(x_general).contribution_maps
                channels = [z.shape[1] for z in out_g.latents]
                term = outlier_bce_per_location(out_g.contribution_maps, maps_g_g, channels, out_cfg.temperature)
            elif out_cfg.kind == "bce":
                with torch.no_grad():
                    log_p_g_g = self.general(x_general).log_prob
                term = outlier_bce(log_p_in_g, log_p_g_g, out_cfg.temperature)
            else:
                term = outlier_margin(-log_p_in, -log_p_in_g, out_cfg.margin)
            loss = loss + out_cfg.weight * term * self.nats_to_bpd
            parts["outlier"] = term.item()
        return loss, parts


def train(config: RunConfig, out_dir: Path, data: TrainData | None = None, show_progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Train (or resume) the run described by ``config`` into ``out_dir``.

    ``stop_after`` ends the loop early after that many total steps, leaving a checkpoint as an
    interruption would (used to test exact resumption).
    """
    config.validate()
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    group = distributed.init(device)  # under torchrun: this process's rank; otherwise a group of one
    device = distributed.device_for(group, device)
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.exists():
        _check_resumable(out_dir, config)
    distributed.barrier(group)  # every rank has read the old config before rank 0 writes the new one
    if group.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # temporary files of a killed run (atomic writes never finished)
            stale.unlink(missing_ok=True)
        write_yaml(out_dir / MODEL_CONFIG, config_to_dict(config))
        _attach_log_file(out_dir)
    distributed.barrier(group)
    finished = _finished_result(out_dir, checkpoint_path, config)
    if finished is not None:  # nothing to do: no data to load, no model to rebuild
        return finished
    data = data or load_train_data(config)
    _check_data(data, config)

    torch.manual_seed(config.seed)
    model = Glow(config.model)
    if config.init_from:
        load_weights(model, Path(config.init_from) / "model.safetensors", classes_from_unconditional=True)
        log.info("initialised from %s", config.init_from)
    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    general = None
    needs_general = (config.outlier.enabled and config.outlier.kind == "bce") or config.supervised
    if config.general_model and needs_general:
        general, general_cfg = load_model(Path(config.general_model), device)
        if general_cfg.model.image_size != config.model.image_size or \
                general_cfg.model.in_channels != config.model.in_channels:
            raise ModelFolderError(f"{config.general_model}: general model input differs from this model's")
        general.requires_grad_(False)
    optimizer = _make_optimizer(model, config)

    state = {"step": 0, "skipped_steps": 0, "history": [], "train_seconds": 0.0, "images_seen": 0}
    if checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, model, optimizer)
        log.info("resumed from %s at step %d", checkpoint_path, state["step"])

    sampler = _BatchSampler(len(data.train), config.optim.batch_size, config.seed, stream=0)
    general_sampler = (_BatchSampler(len(data.general), config.outlier.batch_size, config.seed, stream=1)
                       if data.general is not None else None)
    for batch_size in (sampler.batch_size, general_sampler.batch_size if general_sampler else 0):
        distributed.check_split(group, batch_size)  # a batch the ranks cannot split: say so now
    if state["step"] == 0 and not all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm)):
        # ActNorm's data-dependent initialisation, on the whole first global batch (on every rank alike)
        with torch.no_grad():
            model(_global_batch(data, sampler, None, config, 0)[0].to(device))
    trained = model
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    objective = _Objective(trained, general, config)
    # training steps only (the general model's and every evaluation's forward passes stay float32)
    network_dtype = training_dtype(config.train_precision)
    if network_dtype is not None and not native_bfloat16(device) and group.is_main:
        log.warning("train_precision %s on %s, which does not multiply it natively: training steps will likely be "
                    "slower than in float32 (docs/speed.md); set train_precision: float32 there",
                    config.train_precision, device)
    total_steps = config.optim.steps
    last_step = min(total_steps, stop_after) if stop_after is not None else total_steps
    consecutive_skips = 0
    running_bpd = None
    test_bpd = None

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not (show_progress and group.is_main),
    )
    with progress:
        task = progress.add_task("train", total=total_steps, completed=state["step"], status="")
        while state["step"] < last_step:
            step = state["step"]
            started = time.perf_counter()
            # every rank draws the whole batch, then moves only its own share to the device
            x, mask, labels, x_general = (None if t is None else distributed.shard(group, t).to(device)
                                          for t in _global_batch(data, sampler, general_sampler, config, step))
            for param_group in optimizer.param_groups:
                param_group["lr"] = _lr_at(step, config)
            with coupling_networks_in(model, network_dtype):
                loss, parts = objective(x, labels, x_general, mask)
            skipped = not distributed.all_finite(group, loss)  # every rank skips, or none
            if not skipped:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                limit = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
                skipped = not torch.isfinite(grad_norm)
                if not skipped:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if skipped:
                state["skipped_steps"] += 1
                consecutive_skips += 1
                log.warning("step %d skipped: non-finite loss or gradient (%d skipped so far)",
                            step, state["skipped_steps"])
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise TrainingError(f"training diverged: {consecutive_skips} consecutive steps with "
                                        f"non-finite loss or gradients at step {step}; lower optim.lr")
            else:
                consecutive_skips = 0
                parts = distributed.mean_over_ranks(group, parts, device)
                running_bpd = parts["bpd"] if running_bpd is None else 0.98 * running_bpd + 0.02 * parts["bpd"]
            state["step"] = step + 1
            state["train_seconds"] += time.perf_counter() - started
            state["images_seen"] += group.world * (len(x) + (len(x_general) if x_general is not None else 0))
            ips = state["images_seen"] / max(state["train_seconds"], 1e-9)
            status = f"loss {loss.item():.3f}  bpd {running_bpd or float('nan'):.3f}  {ips:.0f} img/s"
            progress.update(task, completed=state["step"], status=status)

            finished = state["step"] == total_steps
            if (state["step"] % config.eval_every == 0 or finished) and group.is_main:
                if data.test is not None:
                    test_bpd = _test_bpd(model, data.test, config)
                    model.train()
                entry = {"step": state["step"], "train_bpd": running_bpd, "test_bpd": test_bpd,
                         "images_per_second": ips, **parts}
                state["history"].append(entry)
                log.info("step %d: train bpd %.4f, test bpd %s, %.1f img/s", state["step"],
                         running_bpd or float("nan"), "-" if test_bpd is None else f"{test_bpd:.4f}", ips)
            if (state["step"] % config.checkpoint_every == 0 or finished or state["step"] == last_step) \
                    and group.is_main:
                _save_checkpoint(checkpoint_path, model, optimizer, state)

    ips = state["images_seen"] / max(state["train_seconds"], 1e-9)
    result = TrainResult(out_dir, state["step"], state["skipped_steps"], running_bpd or float("nan"),
                         test_bpd, ips, state["history"])
    distributed.barrier(group)  # the last checkpoint is written before any rank goes on
    if state["step"] == total_steps and group.is_main:
        save_model(model.eval(), config, out_dir)
        write_json(out_dir / "metrics.json", {
            "steps": state["step"],
            "skipped_steps": state["skipped_steps"],
            "train_bpd_running": running_bpd,
            "test_bpd": test_bpd,
            "test_images": len(data.test) if data.test is not None else 0,
            "images_per_second": ips,
            "train_seconds": state["train_seconds"],
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "history": state["history"],
        })
        log.info("finished: %d steps, %d skipped, model in %s", state["step"], state["skipped_steps"], out_dir)
    distributed.barrier(group)  # the model is saved before any rank reads it
    return result


def _finished_result(out_dir: Path, checkpoint_path: Path, config: RunConfig) -> TrainResult | None:
    """The result of a run that already reached its step count, read from its checkpoint, else None."""
    from safetensors import safe_open

    if not (checkpoint_path.exists() and (out_dir / "model.safetensors").exists()):
        return None
    try:
        with safe_open(str(checkpoint_path), framework="pt") as fh:
            state = json.loads((fh.metadata() or {}).get("medflowad", "{}")).get("state", {})
        step = int(state.get("step", 0))
    except Exception as exc:  # safetensors' own error type, JSON errors, a state of the wrong shape
        raise TrainingError(f"{checkpoint_path}: cannot read checkpoint ({' '.join(str(exc).split())[:200]}); "
                            "delete it to start the run again") from exc
    if step < config.optim.steps:
        return None
    history = state.get("history", [])
    last = history[-1] if history else {}
    ips = state["images_seen"] / max(state["train_seconds"], 1e-9)
    return TrainResult(out_dir, state["step"], state["skipped_steps"], last.get("train_bpd") or float("nan"),
                       last.get("test_bpd"), ips, history)


def _global_batch(data: TrainData, sampler: _BatchSampler, general_sampler: _BatchSampler | None,
                  config: RunConfig, step: int) -> tuple[torch.Tensor | None, ...]:
    """(x, masks, labels, x_general) of step ``step``'s whole batch on the CPU, all randomness seeded by
    (seed, step), so every process of a distributed run draws the same batch as a single process would
    (None: not used)."""
    gen = torch.Generator().manual_seed(_mix(config.seed, 2, step))
    idx = sampler.indices(step)
    mask = None
    if data.train.masks is None:
        x = _augment_and_dequantize(data.train.images[idx], config, gen)
    else:  # masks shift and flip with their images
        both = _augment(torch.cat([data.train.images[idx], data.train.masks[idx]], dim=1), config, gen)
        x = _dequantize(both[:, :-1], gen)
        mask = both[:, -1:]
    labels = data.train.labels[idx] if config.supervised else None
    x_general = None
    if general_sampler is not None:
        x_general = _augment_and_dequantize(data.general.images[general_sampler.indices(step)], config, gen)
    return x, mask, labels, x_general


def _augment(images: torch.Tensor, config: RunConfig, gen: torch.Generator) -> torch.Tensor:
    if config.data.translate > 0:
        images = random_translate(images, config.data.translate, gen)
    if config.data.hflip:
        images = random_hflip(images, gen)
    return images


def _dequantize(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return to_model_input(images, torch.rand(images.shape, generator=gen))


def _augment_and_dequantize(images: torch.Tensor, config: RunConfig, gen: torch.Generator) -> torch.Tensor:
    return _dequantize(_augment(images, config, gen), gen)


def _test_bpd(model: Glow, test: ImageSet, config: RunConfig) -> float:
    result = likelihoods(model, test.images, batch_size=256)
    return float(bits_per_dim(torch.from_numpy(result.log_prob), config.model.num_dims).mean())


def _check_data(data: TrainData, config: RunConfig) -> None:
    if config.supervised and data.train.masks is not None and config.general_model:
        raise TrainingError(f"{data.train.source}: likelihood masks and the supervised class loss (a general "
                            "model) do not go together: the class loss needs every location's likelihood")
    if config.supervised:
        labels = data.train.labels
        if (labels < 0).any() or (labels >= config.model.num_classes).any():
            raise TrainingError(f"{data.train.source}: supervised training needs labels in "
                                f"0..{config.model.num_classes - 1}, found {labels.min()}..{labels.max()}")
    if len(data.train) == 0:
        raise TrainingError(f"{data.train.source}: no training images")


def _attach_log_file(out_dir: Path) -> None:
    path = (out_dir / "train.log").resolve()
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
