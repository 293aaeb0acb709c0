"""``medflowad``: a thin Typer layer over the library; every command's work lives in medflowad/."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="medflowad",
    help="Likelihood-based anomaly detection with Glow: hierarchies of distributions and features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # never break file paths across lines
PATTERN_HELP = ("only scans whose file name or scan id matches this glob, case-insensitive; a DICOM series' "
                "id holds its number and description, so '*flair*' picks the FLAIR series of a study folder.")


@contextmanager
def _status(message: str, quiet: bool) -> Iterator:
    """A live status line, or a silent stand-in with the same ``update`` method."""
    if quiet:
        yield SimpleNamespace(update=lambda *_: None)
    else:
        with console.status(message) as status:
            yield status


SpaceOption = Annotated[str | None, typer.Option(
    "--space", help="Preparation: standard (brain registered to the MNI template, a slice index is a brain level) "
    "or native (the scan's own grid); default: the config's.")]
BrainOption = Annotated[str | None, typer.Option(
    "--brain", help="Brain extraction: deepbet, or auto (intensity foreground, skull kept); default: the config's.")]
N4Option = Annotated[bool | None, typer.Option("--n4/--no-n4", help="N4 bias-field correction; default: the config's.")]
ON_INTERRUPT_SCORE = "the scans finished so far are saved; the same command with --continue scores the rest"


def _friendly_errors(func: Callable) -> Callable:
    """Turn the library's expected errors into one red line and exit code 2, never a traceback."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        from medflowad.config import ConfigError
        from medflowad.data.natural import DataError
        from medflowad.data.readers import ScanError
        from medflowad.storage import ModelFolderError
        from medflowad.training.trainer import TrainingError

        try:
            return func(*args, **kwargs)
        except (ConfigError, DataError, ScanError, ModelFolderError, TrainingError, ValueError,
                FileNotFoundError, FileExistsError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            hint = (ON_INTERRUPT_SCORE if func.__name__ == "score"
                    else "a checkpointed run resumes with the same command")
            err_console.print(f"[yellow]interrupted[/]; {hint}")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@_friendly_errors
def info() -> None:
    """Versions, threads and the device medflowad would use."""
    import torch

    import medflowad
    from medflowad.devices import resolve_device
    from medflowad.mri.model import bundled_models

    table = Table(show_header=False, box=None)
    rows = [("medflowad", medflowad.__version__), ("python", platform.python_version()),
            ("platform", platform.platform()), ("torch", torch.__version__),
            ("torch threads", str(torch.get_num_threads())),
            ("cuda available", str(torch.cuda.is_available())),
            ("default device", str(resolve_device("auto"))),
            ("bundled models", ", ".join(bundled_models()) or "none")]
    if torch.cuda.is_available():
        rows.append(("gpu", torch.cuda.get_device_name(0)))
    for package in ("monai", "nibabel", "SimpleITK", "pydicom", "sklearn", "safetensors", "numpy"):
        try:
            module = __import__(package)
            rows.append((package, getattr(module, "__version__", "installed")))
        except ImportError:
            rows.append((package, "[red]missing[/]"))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)


@app.command()
@_friendly_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (created; an interrupted run resumes).")],
    config: Annotated[str | None, typer.Option(
        "--config", "-c", help="YAML file or preset: cifar10_cpu (default), cifar10_paper, sample; "
        "with --modality: mri_cpu (default for flair, t2, pd), t1_cpu (default for t1: the normative intensity as "
        "map, N4, landmarks), ct_cpu (default for ct: HU brain window).")] = None,
    modality: Annotated[str | None, typer.Option(
        help="Brain-MRI mode: t1, t2, flair, pd or ct. Trains general + in-distribution models and calibrates.")
    ] = None,
    data: Annotated[list[Path] | None, typer.Option(
        help="MRI mode: healthy scans (files, folders, DICOM folders); repeatable.")] = None,
    pool: Annotated[Path | None, typer.Option(help="MRI mode: general scan pool (medflowad pool build).")] = None,
    pattern: Annotated[str | None, typer.Option(help=f"MRI mode: {PATTERN_HELP}")] = None,
    lesion_masks: Annotated[str | None, typer.Option(
        help="MRI mode: OLD=NEW turns a scan name into its lesion-mask name (e.g. _flair=_mask); "
        "slices with lesions are left out of training.")] = None,
    train_data: Annotated[str | None, typer.Option(help="Training set spec, e.g. cifar10.zip::train.")] = None,
    test_data: Annotated[str | None, typer.Option(help="Held-out set for bits/dim, e.g. cifar10.zip::test.")] = None,
    general_data: Annotated[str | None, typer.Option(help="General samples for the outlier loss.")] = None,
    general_model: Annotated[Path | None, typer.Option(help="Frozen general model folder.")] = None,
    init_from: Annotated[Path | None, typer.Option(help="Start from this model folder's weights.")] = None,
    outlier_loss: Annotated[bool | None, typer.Option(
        "--outlier-loss/--no-outlier-loss", help="Train against general samples (needs both general options).")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps (MRI mode: of the in-distribution model).")
                     ] = None,
    general_steps: Annotated[int | None, typer.Option(min=1, help="MRI mode: steps of the general model.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per step (MRI mode: of both models).")
                          ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (2e-4 is safe for fine-tuning).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    calibration_seed: Annotated[int | None, typer.Option(
        help="MRI mode: seed of the draw of calibration scans (default: --seed); fix it to vary training alone.")
    ] = None,
    space: SpaceOption = None,
    brain: BrainOption = None,
    n4: N4Option = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a Glow from a preset or YAML config (natural images), or, with --modality, an MRI model folder."""
    if modality is not None:
        image_only = {"--train-data": train_data, "--test-data": test_data, "--general-data": general_data,
                      "--init-from": init_from}
        given = [name for name, value in image_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with --modality (healthy scans: --data; general "
                             "samples: --pool; a trained general model to start from: --general-model)")
        from medflowad.mri.config import default_mri_preset

        _train_mri(modality, config or default_mri_preset(modality), data, out, pool, general_model, pattern,
                   lesion_masks, outlier_loss, steps, general_steps, batch_size, lr, device, seed, calibration_seed,
                   quiet, {"space": space, "brain": brain, "n4": n4})
        return
    mri_only = {"--data": data, "--pool": pool, "--pattern": pattern, "--lesion-masks": lesion_masks,
                "--general-steps": general_steps, "--calibration-seed": calibration_seed, "--space": space,
                "--brain": brain, "--n4": n4}
    given = [name for name, value in mri_only.items() if value is not None and value != []]
    if given:
        raise ValueError(f"{', '.join(given)}: MRI-mode options; add --modality (or use --train-data for images)")
    from medflowad.config import with_overrides
    from medflowad.presets import load_preset_or_file
    from medflowad.training import train as run_training

    run_config = with_overrides(load_preset_or_file(config or "cifar10_cpu"), {
        "data.train": train_data, "data.test": test_data, "data.general": general_data,
        "general_model": str(general_model) if general_model else None,
        "init_from": str(init_from) if init_from else None, "outlier.enabled": outlier_loss,
        "optim.steps": steps, "optim.batch_size": batch_size, "optim.lr": lr, "device": device, "seed": seed,
    })
    result = run_training(run_config, out, show_progress=not quiet)
    if not _main_process():
        return
    summary = f"trained {result.steps} steps ({result.skipped_steps} skipped), {result.images_per_second:.0f} img/s"
    if result.test_bpd is not None:
        summary += f", test bits/dim {result.test_bpd:.3f}"
    console.print(summary)
    console.print(f"model folder: [bold]{out}[/]")


def _main_process() -> bool:
    """False in the other ranks of a torchrun launch: rank 0 alone reports."""
    from medflowad.training.distributed import from_environment

    return from_environment().is_main


def _parse_replace(value: str | None, option: str = "--lesion-masks") -> tuple[str, str] | None:
    if value is None:
        return None
    old, sep, new = value.partition("=")
    if not sep or not old or not new:
        raise ValueError(f"{option} expects OLD=NEW (e.g. _flair=_mask), got {value!r}")
    return old, new


def _train_mri(modality, config_name, data, out, pool, general_model, pattern, lesion_masks, outlier_loss,
               steps, general_steps, batch_size, lr, device, seed, calibration_seed, quiet, preparation) -> None:
    from medflowad.mri.config import load_mri_config
    from medflowad.mri.training import train_mri_model

    if not data:
        raise ValueError("--modality needs --data with the healthy scans")
    config = load_mri_config(config_name)
    config.modality = modality
    config.preprocessing = config.preprocessing.overridden(**preparation)
    if outlier_loss is not None:
        config.outlier.enabled = outlier_loss
    if steps is not None:
        config.in_steps = steps
    if general_steps is not None:
        config.general_steps = general_steps
    if batch_size is not None:
        config.batch_size = batch_size
    if lr is not None:
        config.in_lr = lr
    if device is not None:
        config.device = device
    if seed is not None:
        config.seed = seed
    if calibration_seed is not None:
        config.calibration_seed = calibration_seed
    metrics = train_mri_model(config, data, out, pool=pool, general_model=general_model, pattern=pattern,
                              mask_replace=_parse_replace(lesion_masks), show_progress=not quiet,
                              echo=lambda m: console.print(m, highlight=False))
    if not _main_process():
        return
    console.print(f"{metrics['train_scans']} training and {metrics['val_scans']} calibration scans; "
                  f"in-distribution test bits/dim {metrics['in_model_test_bpd']:.3f}")
    for skipped in metrics["skipped_scans"]:
        err_console.print(f"[yellow]skipped[/] {skipped['error']}", highlight=False)
    console.print(f"model folder: [bold]{out}[/] (all that `medflowad score` needs)")


def _parse_named_sets(values: list[str]) -> dict[str, str]:
    sets = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--ood expects NAME=SPEC, got {value!r}")
        if name in sets:
            raise ValueError(f"--ood name {name!r} given twice")
        sets[name] = spec
    return sets


@app.command()
@_friendly_errors
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="In-distribution (or MRI) model folder.")],
    in_data: Annotated[str | None, typer.Option("--in", help="In-distribution test set spec.")] = None,
    ood: Annotated[list[str] | None, typer.Option(help="NAME=SPEC of an out-of-distribution set; repeatable.")
                   ] = None,
    scans: Annotated[list[Path] | None, typer.Option(
        help="MRI mode: scans with lesion masks (files or folders); repeatable.")] = None,
    lesion_masks: Annotated[str, typer.Option(help="MRI mode: OLD=NEW from scan name to mask name.")
                            ] = "_flair=_mask",
    pattern: Annotated[str | None, typer.Option(help=f"MRI mode: {PATTERN_HELP}")] = None,
    general_model: Annotated[Path | None, typer.Option(help="General model folder (enables llr).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for metrics.json, table.md and per-image or per-slice scores.")] = None,
    score: Annotated[list[str] | None, typer.Option(
        help="Report only this score (nll, llr, last_scale, c_1.., input_complexity, nll_general); repeatable.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Random subset of at most N images per set.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    input_complexity: Annotated[bool, typer.Option(
        "--input-complexity/--no-input-complexity", help="Also compute the PNG-based baseline.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Natural images: AUROC / AUPR / FPR@95TPR of every score for --in vs each --ood set.
    MRI (--scans): slice AUROC/AUPRC, voxel AUPRC, Dice at the healthy-FPR threshold and best Dice."""
    if scans:
        _evaluate_mri(model, scans, lesion_masks, pattern, out, device, batch_size, quiet)
        return
    if not in_data or not ood:
        raise ValueError("give --in and at least one --ood (natural images), or --scans (MRI)")
    from medflowad.evaluation import evaluate_ood

    report = evaluate_ood(model, in_data, _parse_named_sets(ood), general_model, out, batch_size, device,
                          limit, input_complexity, show_progress=not quiet, only=score)
    _print_report(report)
    if out is not None:
        console.print(f"results: [bold]{out / 'table.md'}[/], {out / 'metrics.json'}")


def _evaluate_mri(model, scans, lesion_masks, pattern, out, device, batch_size, quiet) -> None:
    from medflowad.mri.evaluate import evaluate_scans, metrics_markdown

    with _status("evaluating scans", quiet) as status:
        result = evaluate_scans(model, scans, _parse_replace(lesion_masks), out, pattern, device, batch_size,
                                on_scan=lambda p: status.update(f"evaluated {Path(p).name}"))
    console.print(metrics_markdown(result), highlight=False, soft_wrap=True)
    for failed in result["failed"]:
        err_console.print(f"[yellow]not evaluated[/] {failed['error']}", highlight=False)
    if result["trained_or_calibrated"]:
        err_console.print(f"[yellow]warning:[/] {len(result['trained_or_calibrated'])} of these scans trained or "
                          "calibrated the model; the metrics are not a test of it", highlight=False)


@app.command()
@_friendly_errors
def prepare(
    paths: Annotated[list[Path], typer.Argument(help="Scans: NIfTI/NRRD/MHA files, folders, DICOM series folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the prepared scans (one folder each).")],
    config: Annotated[str, typer.Option("--config", "-c", help="MRI config, preset, model folder or bundled "
                                        "model (demo) whose preparation to run.")] = "mri_cpu",
    space: SpaceOption = None,
    brain: BrainOption = None,
    n4: N4Option = None,
    brain_masks: Annotated[str | None, typer.Option(
        help="OLD=NEW from scan name to a brain-mask file beside it, used instead of brain extraction.")] = None,
    pattern: Annotated[str | None, typer.Option(help=PATTERN_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Brain extraction, registration to the MNI template and resampling onto the standard grid, cached.

    Writes per scan the prepared scan, its brain masks and the transform (NIfTI, ITK .tfm, JSON), and
    preparation.csv. pool build, train, score and evaluate prepare their scans the same way and reuse
    these results from the cache ($MEDFLOWAD_CACHE, default ~/.cache/medflowad).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from medflowad.mri.config import load_mri_config
    from medflowad.mri.model import bundled_models, resolve_model_dir
    from medflowad.prep.batch import prepare_scans

    if not Path(config).exists() and config in bundled_models():
        config = str(resolve_model_dir(config))
    source = Path(config) / "mri.yaml" if (Path(config) / "mri.yaml").is_file() else config
    preprocessing = load_mri_config(str(source)).preprocessing.overridden(space=space, brain=brain, n4=n4)
    progress = Progress(TextColumn("[bold]prepare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        console=console, disable=quiet)
    with progress:
        tasks = []

        def on_scan(row: dict) -> None:
            progress.update(tasks[0], advance=1, description=row["scan_id"])
            if row["status"] != "ok":
                progress.console.print(f"[red]failed[/] {row['error']}", highlight=False)

        rows = prepare_scans(paths, preprocessing, out, pattern, _parse_replace(brain_masks, "--brain-masks"),
                             on_start=lambda total: tasks.append(progress.add_task("", total=total)), on_scan=on_scan)
    failed = [r for r in rows if r["status"] != "ok"]
    cached = sum(bool(r.get("cached")) for r in rows)
    console.print(f"{len(rows) - len(failed)} scans prepared in [bold]{out}[/] ({cached} from the cache); "
                  f"space {preprocessing.space}, brain {preprocessing.brain}; table: {out / 'preparation.csv'}")
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(rows)} scans failed[/] (reasons in preparation.csv)")
        raise typer.Exit(1)


@app.command()
@_friendly_errors
def score(
    paths: Annotated[list[Path], typer.Argument(help="Scans: NIfTI/NRRD/MHA files, folders, DICOM series folders.")],
    model: Annotated[str, typer.Option("--model", "-m", help="MRI model folder (medflowad train --modality), "
                                       "or the name of a bundled model: demo.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for maps and tables.")],
    report: Annotated[bool, typer.Option("--report", help="Also write report.html: per scan the score, p-value, "
                                         "flag, a slice montage with the map and the healthy histogram.")] = False,
    fpr: Annotated[float | None, typer.Option(help="False-positive rate for flags (default: the model's, 5 %).")
                   ] = None,
    brain_masks: Annotated[str | None, typer.Option(
        help="OLD=NEW from scan name to a brain-mask file beside it (e.g. .nii=_brainmask.nii), used instead "
        "of the model's brain extraction.")] = None,
    pattern: Annotated[str | None, typer.Option(help=PATTERN_HELP)] = None,
    resume: Annotated[bool, typer.Option("--continue", help="Skip scans that OUT already holds scored by this "
                                         "model, e.g. after an interruption.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    num_parts: Annotated[int | None, typer.Option(
        min=1, help="Split the scans into this many parts (one job each; then `medflowad score-merge OUT`).")
    ] = None,
    part_id: Annotated[int | None, typer.Option(min=0, help="Which part this job scores: 0 .. num-parts - 1.")
                       ] = None,
    prepare_ahead: Annotated[bool, typer.Option(
        help="Prepare the next scan in a thread while this one is scored (same results).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score scans: per-scan scores, p-values and flags, and NIfTI anomaly maps on each scan's own grid.

    A DICOM folder holding several series is scored series by series. Scoring into a folder of earlier
    results of the same model adds to its tables (a scan scored again replaces its own rows and maps);
    processes scoring into one folder at once keep each other's rows. With --num-parts/--part-id (or under
    torchrun, one part per process, merged by rank 0) each part writes its maps into OUT and its tables into
    OUT/parts/; `medflowad score-merge OUT` joins them.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from medflowad.mri.score import merge_parts, score_scans
    from medflowad.training import distributed

    if (num_parts is None) != (part_id is None):
        raise ValueError("--num-parts and --part-id go together (e.g. --num-parts 4 --part-id 0)")
    group = distributed.from_environment()
    if num_parts is None and group.active:  # under torchrun: one part per process, rank 0 merges
        num_parts, part_id = group.world, group.rank
        if device in ("auto", "cuda") and torch.cuda.is_available():  # one GPU per process
            device = f"cuda:{group.local_rank % torch.cuda.device_count()}"
    part = (part_id, num_parts) if num_parts is not None and part_id is not None else None  # checked by score_scans
    sharded = part is not None and part[1] > 1
    merge_here = sharded and group.active
    if report and sharded and not merge_here:
        raise ValueError("a part writes no report: run `medflowad score-merge OUT --report` after all parts")

    progress = Progress(TextColumn("[bold]score[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        console=console, disable=quiet)
    with progress:
        tasks = []  # the bar appears once the scans are found

        def on_scan(sid: str, row: dict) -> None:
            progress.update(tasks[0], advance=1, description=sid)
            if row["status"] != "ok":
                progress.console.print(f"[red]failed[/] {row['error']}", highlight=False)

        result = score_scans(paths, model, out, device, batch_size, fpr, on_scan=on_scan,
                             brain_masks=_parse_replace(brain_masks, "--brain-masks"),
                             report=report and not sharded, pattern=pattern, resume=resume,
                             on_start=lambda total: tasks.append(progress.add_task("", total=total)), part=part,
                             prepare_ahead=prepare_ahead)
    if merge_here:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only to wait for every part; scoring needs no communication
        dist.barrier()
        if group.is_main:
            merged = merge_parts(out, model, device, report, _parse_replace(brain_masks, "--brain-masks"))
            console.print(f"merged {num_parts} parts: {len(merged.rows)} scans in {out / 'scores.csv'}")
    table = Table(title=f"scan scores (flag: {result.scan_score} p <= {fpr or 'model FPR'})")
    shown = list(dict.fromkeys((result.scan_score, "llr", "last_scale")))[:2]  # the flagging score and one more
    columns = ["scan", "status", shown[0], "p", "flag"] + [c for name in shown[1:] for c in (name, "p")] + ["slices"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("scan", "status") else "right",
                         overflow="fold" if column == "scan" else "ellipsis")  # ids stay whole
    for row in result.rows:
        if row["status"] == "ok":
            values = [f"{row[shown[0]]:.2f}", f"{row[shown[0] + '_p']:.3f}",
                      "[red]yes[/]" if row[f"{shown[0]}_flag"] else "no"]
            values += [v for name in shown[1:] for v in (f"{row[name]:.1f}", f"{row[name + '_p']:.3f}")]
            status = "[yellow]unlike healthy[/]" if row.get("unlike_healthy") is True else "ok"  # see the warning
            table.add_row(row["scan_id"], status, *values, f"{row['scored_slices']}/{row['slices']}")
        else:
            table.add_row(row["scan_id"], "[red]error[/]", *[""] * (len(columns) - 2))
    console.print(table)
    failed = sum(r["status"] != "ok" for r in result.rows)
    if result.warning:
        err_console.print(f"[yellow]warning:[/] {result.warning}")
    if result.resumed:
        console.print(f"{len(result.resumed)} scans were scored before (--continue) and kept as they were")
    if result.kept_rows:
        console.print(f"the tables also keep {len(result.kept_rows)} scans scored into {out} by earlier runs")
    console.print(f"maps and tables in [bold]{out}[/] (scores.csv, slices.csv, scores.json)")
    if result.report is not None:
        console.print(f"report: [bold]{result.report}[/] (open it in a browser)")
    if failed:
        err_console.print(f"[red]{failed} of {len(result.rows)} scans failed[/] (reasons in scores.csv)")
        raise typer.Exit(1)


@app.command("score-merge")
@_friendly_errors
def score_merge(
    out: Annotated[Path, typer.Argument(help="The OUT folder the parts scored into.")],
    report: Annotated[bool, typer.Option("--report", help="Also write report.html for every scan.")] = False,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="The model folder (default: the one the parts name); needed for --report.")] = None,
    brain_masks: Annotated[str | None, typer.Option(help="As given to score, for the report's figures.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (report figures only).")] = "auto",
) -> None:
    """Join the tables of `score --num-parts N --part-id K` jobs into OUT's scores.csv, slices.csv and
    scores.json (and report.html), row for row as one process would have written them."""
    from medflowad.mri.score import PARTS_FOLDER, merge_parts

    merged = merge_parts(out, model, device, report, _parse_replace(brain_masks, "--brain-masks"))
    failed = sum(r["status"] != "ok" for r in merged.rows)
    console.print(f"merged {len(list((out / PARTS_FOLDER).glob('part-*')))} parts: {len(merged.rows)} scans "
                  f"({failed} failed) into [bold]{out}[/] (scores.csv, slices.csv, scores.json)")
    if merged.report is not None:
        console.print(f"report: [bold]{merged.report}[/]")


@app.command()
@_friendly_errors
def calibrate(
    data: Annotated[list[Path], typer.Argument(help="Healthy scans of the site: files, folders, DICOM series "
                                               "folders (two subjects at least; 20 or more for scan flags).")],
    model: Annotated[str, typer.Option("--model", "-m", help="MRI model folder, or a bundled model's name (demo).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New model folder (the same weights, the new calibration).")],
    pattern: Annotated[str | None, typer.Option(help=PATTERN_HELP)] = None,
    lesion_masks: Annotated[str | None, typer.Option(
        help="OLD=NEW from a scan name to its lesion mask (e.g. _t1=_mask): patients' scans calibrate with their "
        "healthy parts only.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")] = False,
) -> None:
    """Calibrate a trained MRI model on healthy scans of your own scanner, without training: a new model folder
    with the same weights and the healthy ranges, landmarks and thresholds of these scans."""
    from medflowad.mri.recalibration import recalibrate_model

    with _status("calibrating", quiet) as status:
        record = recalibrate_model(model, data, out, pattern, _parse_replace(lesion_masks), device,
                                   say=lambda message: status.update(message))
    for skipped in record["skipped_scans"]:
        err_console.print(f"[yellow]skipped[/] {skipped['error']}", highlight=False)
    for note in [*record["notes"], record["limit_note"]]:
        if note:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"calibrated on {len(record['calibration_scans'])} scans of {record['subjects']} subjects; "
                  f"model folder: [bold]{out}[/] (score with --model {out})")


@app.command()
@_friendly_errors
def export(
    model: Annotated[str, typer.Argument(help="MRI model folder, or a bundled model's name (demo).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the bundle to.")],
    format: Annotated[str, typer.Option("--format", "-f", help="Export format: monai-bundle.")] = "monai-bundle",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Export an MRI model, e.g. as a MONAI bundle that `python -m monai.bundle run` executes."""
    if format != "monai-bundle":
        raise ValueError(f"unknown --format {format!r}; supported: monai-bundle")
    from medflowad.mri.bundle import export_monai_bundle

    bundle = export_monai_bundle(model, out, overwrite=overwrite)
    console.print(f"MONAI bundle in [bold]{bundle}[/]; run it with\n  python -m monai.bundle run --config_file "
                  f"{bundle / 'configs' / 'inference.json'} --bundle_root {bundle} --input_dir SCANS "
                  "--output_dir OUT", highlight=False, soft_wrap=True)


bench_app = typer.Typer(help="Benchmarks of PROTOCOL.md as commands.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
BenchOut = Annotated[Path, typer.Option("--out", "-o", help="Benchmark folder (models are reused when present).")]
DataRoot = Annotated[str, typer.Option(help="Data root holding natural/ and medical/; default: $MEDFLOWAD_DATA.")]


@bench_app.command("natural")
@_friendly_errors
def bench_natural(
    out: BenchOut,
    data: DataRoot = "$MEDFLOWAD_DATA",
    preset: Annotated[str, typer.Option(help="cifar10_cpu, cifar10_paper or a YAML path.")] = "cifar10_cpu",
    ood: Annotated[list[str] | None, typer.Option(help="Extra NAME=SPEC OOD set (any format); repeatable.")
                   ] = None,
    general_steps: Annotated[int, typer.Option(min=1, help="Steps of the Tiny ImageNet general model.")] = 1500,
    finetune_steps: Annotated[int, typer.Option(min=1, help="Steps of each CIFAR-10 fine-tuning.")] = 750,
    limit: Annotated[int, typer.Option(min=0, help="Images per evaluation set (0 = all).")] = 2000,
    grey_ood: Annotated[bool, typer.Option(
        "--grey-ood/--no-grey-ood", help="Also score the greyscale brain MRI 2D and head CT sets where present.")
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Protocol A: general model, fine-tuned CIFAR-10 model with and without the outlier loss, all scores."""
    from medflowad.bench.natural import NaturalBenchSettings, natural_markdown, run_natural_bench

    settings = NaturalBenchSettings(data=data, preset=preset, general_steps=general_steps,
                                    finetune_steps=finetune_steps, limit=limit or None, device=device,
                                    grey_ood=grey_ood)
    result = run_natural_bench(settings, out, _parse_named_sets(ood or []), show_progress=not quiet,
                               echo=lambda m: console.print(m, highlight=False))
    columns = list(dict.fromkeys(r["score"] for r in result["rows"]))
    console.print(natural_markdown(result, columns), highlight=False, soft_wrap=True)
    console.print(f"results: [bold]{out / 'results.md'}[/], metrics.json, score_histograms.png, per_scale_auroc.png")


@bench_app.command("mri")
@_friendly_errors
def bench_mri(
    out: BenchOut,
    data: DataRoot = "$MEDFLOWAD_DATA",
    config: Annotated[str, typer.Option("--config", "-c", help="MRI config or preset.")] = "mri_cpu",
    split: Annotated[Path | None, typer.Option(help="Patient split TSV (default: the fixed 60/28 split).")
                     ] = None,
    general_steps: Annotated[int, typer.Option(min=1, help="Steps of the general model.")] = 600,
    in_steps: Annotated[int, typer.Option(min=1, help="Steps of each in-distribution FLAIR model.")] = 400,
    tumor_steps: Annotated[int, typer.Option(min=1, help="Steps of the 2D notumor model.")] = 300,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC convolutions (faster on CPU); default: as the config says.")
    ] = None,
    outlier: Annotated[bool, typer.Option("--outlier/--no-outlier", help="Also train with the outlier loss.")
                       ] = True,
    pool_train_flair: Annotated[bool, typer.Option(
        "--pool-train-flair/--no-pool-train-flair",
        help="Add every slice of the train patients' FLAIR scans, lesion or not, to the general pool "
             "(not the calibration patients').")] = True,
    tumor_2d: Annotated[bool, typer.Option("--tumor-2d/--no-tumor-2d", help="Also run the 2D tumour set.")
                        ] = True,
    space: Annotated[str, typer.Option(help="Preparation space: native (LGG's affine is nominal, so registration "
                                       "to MNI is refused on it) or standard.")] = "native",
    brain: Annotated[str, typer.Option(help="Brain extraction: deepbet, or auto (skull kept).")] = "deepbet",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Protocol B: LGG FLAIR lesions (fixed split) against the intensity baseline, and the 2D tumour set."""
    from medflowad.bench.mri import MriBenchSettings, mri_markdown, run_mri_bench

    settings = MriBenchSettings(data=data, config=config, split=str(split) if split else None,
                                general_steps=general_steps, in_steps=in_steps, tumor_steps=tumor_steps,
                                channels_last=channels_last, outlier=outlier, pool_train_flair=pool_train_flair,
                                tumor_2d=tumor_2d, device=device, space=space, brain=brain)
    result = run_mri_bench(settings, out, show_progress=not quiet, echo=lambda m: console.print(m, highlight=False))
    console.print(mri_markdown(result), highlight=False, soft_wrap=True)
    console.print(f"results: [bold]{out / 'results.md'}[/], metrics.json, maps/, overlays/")


@bench_app.command("t1")
@_friendly_errors
def bench_t1(
    out: BenchOut,
    data: DataRoot = "$MEDFLOWAD_DATA",
    config: Annotated[str, typer.Option("--config", "-c", help="Standard-space MRI config or preset.")
                      ] = "mri_demo",
    split: Annotated[Path | None, typer.Option(help="Subject split TSV (default: the fixed 5/2 IXI split).")
                     ] = None,
    pool: Annotated[list[str] | None, typer.Option(
        help="General pool source; repeatable (default: the 2D tumour set's Training split and the NIfTI samples).")
    ] = None,
    copies: Annotated[int, typer.Option(min=1, help="Painted copies of every held-apart subject.")] = 3,
    lesions: Annotated[int, typer.Option(min=1, help="Lesions per painted copy.")] = 2,
    seed: Annotated[int, typer.Option(help="Painting seed.")] = 0,
    general_steps: Annotated[int | None, typer.Option(min=1, help="Steps of the general model (default: config's).")
                             ] = None,
    in_steps: Annotated[int | None, typer.Option(min=1, help="Steps of the T1 model (default: config's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Protocol D: IXI T1 heads with painted lesions (held-apart subjects), against the |z| intensity baseline."""
    from medflowad.bench.t1 import T1BenchSettings, run_t1_bench, t1_markdown

    settings = T1BenchSettings(data=data, config=config, split=str(split) if split else None, pool=pool,
                               copies=copies, lesions=lesions, seed=seed, general_steps=general_steps,
                               in_steps=in_steps, device=device)
    result = run_t1_bench(settings, out, show_progress=not quiet, echo=lambda m: console.print(m, highlight=False))
    console.print(t1_markdown(result), highlight=False, soft_wrap=True)
    console.print(f"results: [bold]{out / 'results.md'}[/], metrics.json, scores/, overlays/")


@bench_app.command("speed")
@_friendly_errors
def bench_speed(
    out: BenchOut,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run of every part (under a minute).")] = False,
    samples: Annotated[Path | None, typer.Option(help="Folder with the sample scans (default: sample_data/mri).")
                       ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Training and scoring images/s per architecture and layout, seconds per scan by stage, cost against the
    number of scans, DDP scaling and peak memory, with the machine (speed.json, speed.md)."""
    from medflowad.bench.speed import SpeedSettings, run_speed_bench, speed_markdown

    settings = SpeedSettings.quick(device) if quick else SpeedSettings(device=device)
    settings.samples = str(samples) if samples else None
    result = run_speed_bench(settings, out, echo=lambda m: console.print(m, highlight=False))
    console.print(speed_markdown(result), highlight=False, soft_wrap=True)
    console.print(f"results: [bold]{out / 'speed.md'}[/], speed.json")


pool_app = typer.Typer(help="General scan pool for the general-distribution model.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")


@pool_app.command("build")
@_friendly_errors
def pool_build(
    sources: Annotated[list[Path], typer.Argument(help="Volumes, DICOM folders, 2D images, zips, folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Pool folder to write.")],
    config: Annotated[str, typer.Option("--config", "-c", help="MRI config or preset for preprocessing; the same "
                                        "as the models trained on the pool use (ct_cpu for CT models).")
                      ] = "mri_cpu",
    exclude: Annotated[list[str] | None, typer.Option(
        help="Glob of file names to skip; repeatable "
             "(default: *mask*, *roi*, *seg*, *label*, *dlmuse*, *aparc*).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a pool already in --out.")] = False,
    space: SpaceOption = None,
    brain: BrainOption = None,
    n4: N4Option = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Turn any mix of scans and pictures into a slice set, with a manifest of what went in."""
    from medflowad.mri.config import load_mri_config
    from medflowad.mri.pool import DEFAULT_EXCLUDES, build_pool

    preprocessing = load_mri_config(config).preprocessing.overridden(space=space, brain=brain, n4=n4)
    with _status("building pool", quiet) as status:
        manifest = build_pool(sources, out, preprocessing, exclude or DEFAULT_EXCLUDES,
                              progress=lambda p: status.update(f"read {Path(p.split('::')[-1]).name}"),
                              overwrite=overwrite)
    errors = [s for s in manifest["sources"] if s["error"]]
    console.print(f"pool: {manifest['total_slices']} slices from {len(manifest['sources']) - len(errors)} "
                  f"sources in [bold]{out}[/]")
    for source in errors[:20]:
        err_console.print(f"[yellow]skipped[/] {source['error']}", highlight=False)
    if len(errors) > 20:
        err_console.print(f"... and {len(errors) - 20} more (see {out / 'manifest.json'})")


def _print_report(report) -> None:
    from medflowad.evaluation import ordered_scores

    scores = ordered_scores({r["score"] for r in report.rows})
    table = Table(title="AUROC (anomalies = positives; higher score = more anomalous)")
    table.add_column("OOD set")
    for s in scores:
        table.add_column(s, justify="right")
    lookup = {(r["set"], r["score"]): r["auroc"] for r in report.rows}
    for name in dict.fromkeys(r["set"] for r in report.rows):
        table.add_row(f"{name} (n={report.sizes[name]})", *[f"{lookup[(name, s)]:.3f}" for s in scores])
    console.print(table)
    bpd = ", ".join(f"{name}: " + " / ".join(f"{v:.3f}" for v in m.values()) for name, m in report.bits_per_dim.items())
    console.print(f"bits/dim (in-model / general): {bpd}")


def main() -> None:
    app(prog_name="medflowad")


if __name__ == "__main__":
    sys.exit(main())
