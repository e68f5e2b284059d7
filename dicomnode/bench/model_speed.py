"""`dicomnode bench model`: paper Table I with this implementation, plus inference timing.

- GMACs with torch's FLOP counter on the meta device (no real compute): 3D-GMIC counted
  directly at the target slice count, the baselines extrapolated linearly from 4, 8 and 16
  slices as the paper did (their exact count is reported beside it).
- Peak training memory of one step (forward, loss, backward, Adam) in a fresh subprocess
  per configuration: the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU.
  3D-GMIC is measured directly on a GPU. Where a direct measurement does not fit (the
  baselines always; 3D-GMIC on a CPU) it is measured at the fit slice counts and
  extrapolated linearly; on a CPU the baselines are measured at a reduced in-plane size and
  their per-slice slope is scaled by the area ratio. Each row says how it was obtained.
- Inference seconds and peak memory, chunked global network against the naive
  all-slices-at-once pass, each in its own subprocess, median of several runs.

Run as `python -m dicomnode.bench.model_speed PROBE_JSON` it is the subprocess that measures one
configuration and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from dicomnode.bench.report import BenchReport

PAPER = {  # Table I: (GMACs, peak training GPU MB) for a 96-slice DBT
    "3D-GMIC": (798, 22219),
    "ResNet-18": (9932, 171031),
    "ResNet-34": (20056, 223235),
    "3D ResNet-18": (9104, 100903),
    "3D ResNet-34": (12192, 111650),
}
PAPER_SLICES = 96


@dataclass
class ModelBenchOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    slices: int = PAPER_SLICES
    height: int = 2116
    width: int = 1339
    fit_slices: tuple[int, ...] = (4, 8, 16)
    mem_scale: float | None = None  # in-plane downscale of baseline probes; None: 4 CPU, 1 GPU
    time_slices: int | None = None  # None: `slices` on a GPU, 16 (two chunks) on a CPU
    runs: int = 3
    precision: str | None = None  # None: bf16 on a GPU, fp32 on a CPU
    slice_chunk: int = 8
    threads: int = 0  # CPU threads in probes; 0 = torch's default
    skip_memory: bool = False
    skip_timing: bool = False
    baselines: tuple[str, ...] = ("ResNet-18", "ResNet-34", "3D ResNet-18", "3D ResNet-34")
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False)


@dataclass
class Probe:
    model: str
    mode: str  # train | infer
    slices: int
    height: int
    width: int
    device: str
    precision: str = "fp32"
    slice_chunk: int = 8
    runs: int = 1
    threads: int = 0


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return name


def run_model_bench(opts: ModelBenchOptions) -> BenchReport:
    from gmic.flops import baseline_gmacs, gmic_gmacs, linear_extrapolation
    from gmic.model_config import GMICConfig

    device = resolve_device(opts.device)
    on_gpu = device.startswith("cuda")
    precision = opts.precision or ("bf16" if on_gpu else "fp32")
    report = BenchReport("model", device, "cuda" if on_gpu else "rss")
    cfg = GMICConfig.dbt(input_size=(opts.height, opts.width), slice_chunk=opts.slice_chunk)
    fit = list(opts.fit_slices)
    size = f"{opts.slices} slices of {opts.height}x{opts.width}"

    # ---- GMACs ------------------------------------------------------------------------
    opts.log("counting GMACs on the meta device")
    g_global, g_local = gmic_gmacs(cfg, opts.slices)
    gmacs = {"3D-GMIC": g_global + g_local}
    exact = {"3D-GMIC": g_global + g_local}
    for name in opts.baselines:
        counts = [baseline_gmacs(name, d, opts.height, opts.width) for d in fit]
        gmacs[name] = linear_extrapolation(fit, counts, opts.slices)
        exact[name] = baseline_gmacs(name, opts.slices, opts.height, opts.width)

    # ---- peak training memory ---------------------------------------------------------
    peaks: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    if not opts.skip_memory:
        common = dict(device=device, precision=precision, slice_chunk=opts.slice_chunk,
                      threads=opts.threads)
        scale = opts.mem_scale if opts.mem_scale is not None else (1.0 if on_gpu else 4.0)
        for name in ("3D-GMIC", *opts.baselines):
            direct = name == "3D-GMIC" and on_gpu
            h, w = opts.height, opts.width
            if name != "3D-GMIC" and scale != 1.0:
                h, w = max(64, round(opts.height / scale)), max(64, round(opts.width / scale))
            if direct:
                result = run_probe(Probe(name, "train", opts.slices, h, w, **common), opts.log)
                peaks[name], notes[name] = result.get("peak_mb"), "measured"
                if result.get("error"):
                    notes[name] = f"failed: {result['error']}"
                continue
            points = fit
            if name == "3D-GMIC":
                # Below one chunk the activations still grow with D: fit from whole chunks.
                points = [d for d in fit if d >= opts.slice_chunk]
                if len(points) < 2:
                    points = [opts.slice_chunk, 2 * opts.slice_chunk]
            ys, errors = [], []
            for d in points:
                result = run_probe(Probe(name, "train", d, h, w, **common), opts.log)
                if result.get("error"):
                    errors.append(f"{d} slices: {result['error']}")
                    break
                ys.append(result["peak_mb"])
            if errors:
                peaks[name], notes[name] = None, "failed: " + errors[0]
                continue
            area = (opts.height * opts.width) / (h * w)
            # Fit peak = a + b * D; slice-proportional memory (b) also scales with area.
            a = linear_extrapolation(points, ys, 0)
            b = (linear_extrapolation(points, ys, 1) - a) * area
            peaks[name] = round(a + b * opts.slices, 1)
            fit_desc = ",".join(str(d) for d in points)
            notes[name] = (f"fit {fit_desc} slices" if area == 1.0 else
                           f"fit {fit_desc} slices of {h}x{w}, slope x{area:.1f} (area)")

    for name in ("3D-GMIC", *opts.baselines):
        paper_g, paper_m = PAPER[name]
        row = {"name": name, "gmacs": round(gmacs[name], 1), "peak_mb": peaks.get(name),
               "paper_gmacs": paper_g, "paper_peak_mb": paper_m}
        if name != "3D-GMIC":
            row["gmacs_exact"] = round(exact[name], 1)
        if name in notes:
            row["peak_note"] = notes[name]
        if opts.slices != PAPER_SLICES or (opts.height, opts.width) != (2116, 1339):
            row["paper_gmacs"] = row["paper_peak_mb"] = None  # not comparable
        report.rows.append(row)

    # ---- ratios against ResNet-18 per slice (the paper's 91.23%-96.02% less) ----------
    for name in opts.baselines:
        report.add_ratio(f"3D-GMIC less computation than {name} ({size})",
                         round(1 - gmacs["3D-GMIC"] / gmacs[name], 4), f"{name} GMACs")
        if peaks.get(name) and peaks.get("3D-GMIC"):
            report.add_ratio(f"3D-GMIC less training memory than {name}",
                             round(1 - peaks["3D-GMIC"] / peaks[name], 4),
                             f"{name} peak {report.memory_kind}")

    # ---- inference: chunked against naive ---------------------------------------------
    if not opts.skip_timing:
        slices = opts.time_slices or (opts.slices if on_gpu else 2 * opts.slice_chunk)
        variants = [("chunked", opts.slice_chunk, precision), ("naive", 0, precision)]
        if not on_gpu and precision == "fp32":
            variants.append(("chunked", opts.slice_chunk, "bf16"))  # CPU: is bf16 faster?
        medians: dict[tuple[str, str], float] = {}
        peaks_inf: dict[tuple[str, str], float] = {}
        g_inf = sum(gmic_gmacs(cfg, slices))
        for label, chunk, prec in variants:
            result = run_probe(Probe("3D-GMIC", "infer", slices, opts.height, opts.width,
                                     device, prec, chunk, opts.runs, opts.threads), opts.log)
            name = (f"3D-GMIC inference {label} {prec} "
                    f"({slices}x{opts.height}x{opts.width})")
            if result.get("error"):
                report.rows.append({"name": name, "gmacs": round(g_inf, 1), "peak_mb": None,
                                    "paper_gmacs": None, "paper_peak_mb": None,
                                    "peak_note": f"failed: {result['error']}"})
                continue
            medians[(label, prec)] = report.add_timing(name, result["times_s"])
            peaks_inf[(label, prec)] = result["peak_mb"]
            report.rows.append({"name": name, "gmacs": round(g_inf, 1),
                                "peak_mb": result["peak_mb"], "paper_gmacs": None,
                                "paper_peak_mb": None, "peak_note": "measured"})
        c, n = ("chunked", precision), ("naive", precision)
        if c in medians and n in medians:
            report.add_ratio("inference time chunked / naive", round(medians[c] / medians[n], 3),
                             "naive all-slices pass, same run")
            report.add_ratio("inference peak memory chunked / naive",
                             round(peaks_inf[c] / peaks_inf[n], 3),
                             "naive all-slices pass, same run")
        if c in medians and ("chunked", "bf16") in medians and precision != "bf16":
            report.add_ratio("inference time bf16 / fp32 (chunked)",
                             round(medians[("chunked", "bf16")] / medians[c], 3),
                             "fp32, same run")
    return report


def run_probe(probe: Probe, log: Callable[[str], None] = lambda m: None) -> dict:
    """Measure one configuration in a fresh Python process (a clean peak RSS / CUDA peak)."""
    log(f"probe {probe.model} {probe.mode} {probe.slices}x{probe.height}x{probe.width} "
        f"{probe.precision} chunk={probe.slice_chunk}")
    cmd = [sys.executable, "-m", "dicomnode.bench.model_speed", json.dumps(asdict(probe))]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log(f"  done in {time.perf_counter() - start:.1f} s: {proc.stdout.strip()[-160:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode < 0 or proc.returncode == 137:
            tail = f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}; "
            tail += "out of memory?)"
        return {"error": tail[:200]}
    return json.loads(lines[-1])


# ---- the subprocess side ---------------------------------------------------------------

def _peak_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(probe: Probe) -> dict:
    """Run one training step or `runs` inference passes; report peak memory and times."""
    import torch

    from gmic.baselines import build_baseline
    from gmic.loss import gmic_loss
    from gmic.model import GMIC, precision
    from gmic.model_config import GMICConfig

    if probe.threads:
        torch.set_num_threads(probe.threads)
    device = torch.device(probe.device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    if probe.model == "3D-GMIC":
        cfg = GMICConfig.dbt(input_size=(probe.height, probe.width),
                             slice_chunk=probe.slice_chunk)
        model = GMIC(cfg).to(device)
        if on_gpu:
            model.use_channels_last()
    else:
        model = build_baseline(probe.model).to(device)
    volume = torch.randn(probe.slices, probe.height, probe.width, device=device)
    target = torch.tensor([0.0, 1.0], device=device)
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    times: list[float] = []
    try:
        if probe.mode == "train":
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            with precision(device, probe.precision):
                out = model(volume)
                if probe.model == "3D-GMIC":
                    loss = gmic_loss(out, target, cfg.beta)
                else:
                    loss = torch.nn.functional.binary_cross_entropy(out.float(), target)
            loss.backward()
            opt.step()
        else:
            model.eval()
            # Warm up (lazy init, oneDNN/cuDNN kernel choice) on one chunk, untimed.
            warm = volume[:max(1, min(probe.slice_chunk or probe.slices, 2))]
            with torch.no_grad(), precision(device, probe.precision):
                model(warm)
            for _ in range(probe.runs):
                start = time.perf_counter()
                with torch.no_grad(), precision(device, probe.precision):
                    model(volume)
                if on_gpu:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    return {"peak_mb": round(_peak_mb(probe.device), 1), "times_s": times,
            "kind": "cuda" if on_gpu else "rss"}


def _probe_main(argv: Sequence[str]) -> int:
    probe = Probe(**json.loads(argv[0]))
    print(json.dumps(measure(probe)), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_probe_main(sys.argv[1:]))
