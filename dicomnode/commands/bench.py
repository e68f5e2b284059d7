"""`dicomnode bench ...`: each benchmark prints a table and, with ``--json FILE``, writes the
same results as JSON (format: :mod:`dicomnode.bench.report`, README "Benchmarks")."""

from __future__ import annotations

import click

json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False),
                           default=None, help="Also write the results as JSON to this file.")


@click.group()
def bench() -> None:
    """Benchmarks; each reports ratios against a baseline measured in the same run."""


def emit(report, json_path: str | None) -> None:
    click.echo(report.render())
    if json_path:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}")


def _slice_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated slice counts, got {value!r}") from None
    if len(counts) < 2 or min(counts) < 1:
        raise click.BadParameter("give at least two slice counts >= 1, e.g. 4,8,16")
    return counts


@bench.command("model")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--slices", default=96, show_default=True, type=click.IntRange(1),
              help="Slices of the DBT volume for GMACs and memory (the paper: 96).")
@click.option("--height", default=2116, show_default=True, type=click.IntRange(64))
@click.option("--width", default=1339, show_default=True, type=click.IntRange(64))
@click.option("--fit-slices", default="4,8,16", show_default=True, callback=_slice_list,
              help="Slice counts measured for the linear extrapolation (as the paper did).")
@click.option("--mem-scale", type=click.FloatRange(1.0), default=None,
              help="In-plane downscale for baseline memory probes (default 4 on CPU, 1 on GPU).")
@click.option("--time-slices", type=click.IntRange(1), default=None,
              help="Slices for inference timing (default: --slices on GPU, two chunks on CPU).")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1),
              help="Inference runs per path; the median is reported.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Autocast precision (default bf16 on GPU, fp32 on CPU).")
@click.option("--slice-chunk", default=8, show_default=True, type=click.IntRange(1),
              help="Slices per pass of the global network in the chunked path.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="CPU threads per measurement (0: torch's default).")
@click.option("--skip-memory", is_flag=True, help="Skip the training-memory probes.")
@click.option("--skip-timing", is_flag=True, help="Skip the inference timing.")
@json_option
def bench_model(device: str, slices: int, height: int, width: int, fit_slices: tuple[int, ...],
                mem_scale: float | None, time_slices: int | None, runs: int,
                precision: str | None, slice_chunk: int, threads: int, skip_memory: bool,
                skip_timing: bool, json_path: str | None) -> None:
    """Paper Table I (GMACs, peak training memory) and inference speed of 3D-GMIC."""
    from dicomnode.bench.model_speed import ModelBenchOptions, run_model_bench
    from dicomnode.errors import ConfigError

    opts = ModelBenchOptions(device=device, slices=slices, height=height, width=width,
                             fit_slices=fit_slices, mem_scale=mem_scale,
                             time_slices=time_slices, runs=runs, precision=precision,
                             slice_chunk=slice_chunk, threads=threads,
                             skip_memory=skip_memory, skip_timing=skip_timing,
                             log=lambda msg: click.echo(f"  {msg}", err=True))
    try:
        report = run_model_bench(opts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    emit(report, json_path)


@bench.command("store")
@click.option("--postgres-url", envvar="DICOMNODE_BENCH_POSTGRES_URL", default=None,
              metavar="URL", help="Also benchmark this PostgreSQL server (in a scratch schema "
              "dropped afterwards); env DICOMNODE_BENCH_POSTGRES_URL.")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Worker processes claiming jobs concurrently.")
@click.option("--jobs", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Queued jobs to claim and complete.")
@click.option("--instances", type=click.IntRange(min=1), default=500, show_default=True,
              help="Instances to store (file, fsync and index row each).")
@json_option
def bench_store(postgres_url: str | None, workers: int, jobs: int, instances: int,
                json_path: str | None) -> None:
    """Job claims per second (N workers) and instance inserts per second, SQLite/PostgreSQL."""
    from dicomnode.bench.queue import run_store_bench
    from dicomnode.wiring import storage_errors

    with storage_errors():
        report = run_store_bench(postgres_url=postgres_url, workers=workers, jobs=jobs,
                                 instances=instances)
    emit(report, json_path)


@bench.command("scp")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              default=None, help="Send the DICOM files in this folder (default: one synthetic "
              "full-size 4-view DBT study).")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the temporary archive and copies go (default: system temp).")
@json_option
def bench_scp(input_dir: str | None, runs: int, seed: int, workdir: str | None,
              json_path: str | None) -> None:
    """Receive throughput: the node's SCP against dcmtk storescp, same files, same run."""
    from pathlib import Path

    from dicomnode.bench.receive import run_scp_bench

    files = sorted(p for p in Path(input_dir).rglob("*.dcm")) if input_dir else None
    emit(run_scp_bench(files, runs, Path(workdir) if workdir else None, seed), json_path)


@bench.command("stow")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              default=None, help="Send the DICOM files in this folder (default: one synthetic "
              "full-size 4-view DBT study).")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the temporary archives go (default: system temp).")
@json_option
def bench_stow(input_dir: str | None, runs: int, seed: int, workdir: str | None,
               json_path: str | None) -> None:
    """Receive throughput: STOW-RS against C-STORE into the same node, same files, same run."""
    from pathlib import Path

    from dicomnode.bench.stow_receive import run_stow_bench

    files = sorted(p for p in Path(input_dir).rglob("*.dcm")) if input_dir else None
    emit(run_stow_bench(files, runs, Path(workdir) if workdir else None, seed), json_path)


@bench.command("e2e")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              default=None, help="Send the DBT files in this folder (default: one synthetic "
              "full-size 4-view DBT study).")
@click.option("--checkpoint", default=None,
              help="DBT checkpoint (default: random weights at the published size; the "
                   "timing is the same).")
@click.option("--device", default="auto", show_default=True)
@click.option("--idle-seconds", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="Quiet time after which the study counts as complete.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@json_option
def bench_e2e(input_dir: str | None, checkpoint: str | None, device: str, idle_seconds: float,
              seed: int, workdir: str | None, json_path: str | None) -> None:
    """Seconds from the first C-STORE of a 4-view DBT study to the last result received."""
    from pathlib import Path

    from dicomnode.bench.e2e import run_e2e_bench

    files = sorted(Path(input_dir).rglob("*.dcm")) if input_dir else None
    emit(run_e2e_bench(files, checkpoint, device, idle_seconds,
                       Path(workdir) if workdir else None, seed), json_path)


@bench.command("results")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="A DBT image (one multi-frame file; default: the first view "
              "of a synthetic full-size study, removed afterwards).")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the temporary study goes (default: system temp).")
@click.option("--profile", is_flag=True, help="Also print a cProfile of one build and of "
              "one write of each object (stderr).")
@json_option
def bench_results(input_path: str | None, runs: int, seed: int, workdir: str | None,
                  profile: bool, json_path: str | None) -> None:
    """Build and write the results of one DBT view (no model): seconds and bytes per object,
    the worker's writer against pydicom's dcmwrite, zlib levels 1, 6 and 9."""
    from pathlib import Path

    from dicomnode.bench.results import run_results_bench

    emit(run_results_bench(Path(input_path) if input_path else None, runs,
                           Path(workdir) if workdir else None, seed, profile), json_path)
