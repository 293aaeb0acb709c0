"""``medflowad``: a thin Typer layer over the library; every command's work lives in medflowad/."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
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


def _friendly_errors(func: Callable) -> Callable:
    """Turn the library's expected errors into one red line and exit code 2, never a traceback."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        from medflowad.config import ConfigError
        from medflowad.data.natural import DataError
        from medflowad.storage import ModelFolderError
        from medflowad.training.trainer import TrainingError

        try:
            return func(*args, **kwargs)
        except (ConfigError, DataError, ModelFolderError, TrainingError, ValueError, FileNotFoundError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; a checkpointed run resumes with the same command")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@_friendly_errors
def info() -> None:
    """Versions, threads and the device medflowad would use."""
    import torch

    import medflowad
    from medflowad.devices import resolve_device

    table = Table(show_header=False, box=None)
    rows = [("medflowad", medflowad.__version__), ("python", platform.python_version()),
            ("platform", platform.platform()), ("torch", torch.__version__),
            ("torch threads", str(torch.get_num_threads())),
            ("cuda available", str(torch.cuda.is_available())),
            ("default device", str(resolve_device("auto")))]
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
    config: Annotated[str, typer.Option(
        "--config", "-c", help="YAML file, or a preset name: " "cifar10_cpu, cifar10_paper, sample.")] = "cifar10_cpu",
    train_data: Annotated[str | None, typer.Option(help="Training set spec, e.g. cifar10.zip::train.")] = None,
    test_data: Annotated[str | None, typer.Option(help="Held-out set for bits/dim, e.g. cifar10.zip::test.")] = None,
    general_data: Annotated[str | None, typer.Option(help="General samples for the outlier loss.")] = None,
    general_model: Annotated[Path | None, typer.Option(help="Frozen general model folder.")] = None,
    init_from: Annotated[Path | None, typer.Option(help="Start from this model folder's weights.")] = None,
    outlier_loss: Annotated[bool | None, typer.Option(
        "--outlier-loss/--no-outlier-loss", help="Train against general samples (needs both general options).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (2e-4 is safe for fine-tuning).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a Glow on natural images from a preset or YAML config, with flag overrides."""
    from medflowad.config import with_overrides
    from medflowad.presets import load_preset_or_file
    from medflowad.training import train as run_training

    run_config = with_overrides(load_preset_or_file(config), {
        "data.train": train_data, "data.test": test_data, "data.general": general_data,
        "general_model": str(general_model) if general_model else None,
        "init_from": str(init_from) if init_from else None, "outlier.enabled": outlier_loss,
        "optim.steps": steps, "optim.batch_size": batch_size, "optim.lr": lr, "device": device, "seed": seed,
    })
    result = run_training(run_config, out, show_progress=not quiet)
    summary = f"trained {result.steps} steps ({result.skipped_steps} skipped), {result.images_per_second:.0f} img/s"
    if result.test_bpd is not None:
        summary += f", test bits/dim {result.test_bpd:.3f}"
    console.print(summary)
    console.print(f"model folder: [bold]{out}[/]")


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
    model: Annotated[Path, typer.Option("--model", "-m", help="In-distribution model folder.")],
    in_data: Annotated[str, typer.Option("--in", help="In-distribution test set spec.")],
    ood: Annotated[list[str], typer.Option(help="NAME=SPEC of an out-of-distribution set; repeatable.")],
    general_model: Annotated[Path | None, typer.Option(help="General model folder (enables llr).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for metrics.json, table.md, scores.")] = None,
    score: Annotated[list[str] | None, typer.Option(
        help="Report only this score (nll, llr, last_scale, c_1.., input_complexity, nll_general); repeatable.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Random subset of at most N images per set.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    input_complexity: Annotated[bool, typer.Option(
        "--input-complexity/--no-input-complexity", help="Also compute the PNG-based baseline.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score in- and out-of-distribution sets and print AUROC / AUPR / FPR@95TPR for every score."""
    from medflowad.evaluation import evaluate_ood

    report = evaluate_ood(model, in_data, _parse_named_sets(ood), general_model, out, batch_size, device,
                          limit, input_complexity, show_progress=not quiet, only=score)
    _print_report(report)
    if out is not None:
        console.print(f"results: [bold]{out / 'table.md'}[/], {out / 'metrics.json'}")


def _print_report(report) -> None:
    from medflowad.evaluation import _ordered_scores

    scores = _ordered_scores({r["score"] for r in report.rows})
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
