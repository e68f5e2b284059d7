"""`dicomnode bench results`: building and writing the result objects of one DBT view,
without the model.

The source is one DBT image (default: the first view of a synthetic full-size study, about
70 slices of 2080x1750, written to a temporary folder and removed afterwards). Its analysis
has the published model's saliency grid (1/64 of the model input) holding a Gaussian blob
over a few slices, both classes, so the BINARY SEG flags a region for each (overlapping at
its centre, as the random-weights model's saliency in `bench e2e` does) and the map is
mostly zero (more than a real one: `bench e2e` measures real maps' bytes). Timed, median of N runs:

- `build_results` then `encode_result` of each object, as the worker does (the map's and
  the SEG's pixel data deflating in the background while the SR is built: encode.
  deflate_early);
- `build_results` (SEG, malignant Parametric Map, SR), and the same build stage by stage
  (stage_times: reading the source headers, the saliency levels of both classes on the
  result grid, the SEG, the Parametric Map, the SR, the IHE AIR identification);
- writing each object as the worker archives it (encode.encode_result: deflated objects at
  DEFLATE_LEVEL in parallel blocks) against pydicom's dcmwrite (level 6, one call: the
  baseline, same run), and encode_result at zlib levels 1, 6 and 9 with the bytes each
  gives.

With --profile, a cProfile of one build_results and one write of each object is printed
(to stderr, top functions by cumulative time).
"""

from __future__ import annotations

import cProfile
import functools
import io
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from dicomnode.bench.report import BenchReport

T = TypeVar("T")
LEVELS = (1, 6, 9)
SALIENCY_STRIDE = 64  # model input pixels per saliency pixel (the published GMIC)


def bench_analysis(path: Path):
    """An ImageAnalysis of the DBT image at `path` with a synthetic saliency blob."""
    from dicomnode.pipeline.analysis import AlgorithmIdentity, ClassProbabilities, ImageAnalysis
    from dicomnode.pipeline.images import load_image
    from gmic.preprocess import preprocess

    image = load_image(path)
    _, transform = preprocess(image.pixels, image.modality, image.laterality)
    image.release_pixels()  # the results need the geometry only, as in the worker
    depth = image.shape[0]
    in_h, in_w = transform.input_shape
    h, w = -(-in_h // SALIENCY_STRIDE), -(-in_w // SALIENCY_STRIDE)
    rr, cc = np.mgrid[0:h, 0:w]
    blob = np.exp(-((rr - h / 2) ** 2 + (cc - w / 3) ** 2) / (2 * 2.0 ** 2)).astype(np.float32)
    saliency = np.zeros((depth, 2, h, w), dtype=np.float32)
    middle = depth // 2
    for d in range(max(0, middle - 5), min(depth, middle + 6)):
        peak = 0.9 * (1 - abs(d - middle) / 6)
        saliency[d, 1] = peak * blob
        saliency[d, 0] = peak * 0.7 * blob  # both classes above 0.5 at the centre
    algorithm = AlgorithmIdentity(name="3D-GMIC", version="bench", checkpoint_name="bench",
                                  checkpoint_sha256="0" * 64, description="bench saliency")
    probabilities = ClassProbabilities(benign=0.2, malignant=0.7)
    return ImageAnalysis(image=image, algorithm=algorithm, final=probabilities,
                         global_=probabilities, local=probabilities, regions=[],
                         saliency=saliency, transform=transform)


def _dcmwrite(ds) -> list[bytes]:
    from pydicom import dcmwrite

    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return [buffer.getvalue()]


def stage_times(analysis) -> dict[str, float]:
    """Seconds of each stage of one build_results (the same calls in the same order)."""
    from dicomnode.results import ResultOptions, identify_result
    from dicomnode.results.encode import discard
    from dicomnode.results.geometry import read_sources, saliency_levels
    from dicomnode.results.pmap import build_parametric_maps, pmap_class_indices, pmap_factor
    from dicomnode.results.seg import build_segmentation, seg_factor
    from dicomnode.results.sr import build_sr
    from gmic.classes import CLASS_NAMES

    options = ResultOptions()
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    sources = read_sources(analysis)
    lap("source headers")
    factor = pmap_factor(analysis, options)
    levels = ({c: saliency_levels(analysis, c, factor) for c in range(len(CLASS_NAMES))}
              if seg_factor(analysis, sources, options) == factor else None)
    lap("saliency levels (both classes)")
    segmentation = build_segmentation(analysis, options, sources, levels=levels)
    lap("SEG")
    pmaps = build_parametric_maps(
        analysis, options, sources,
        levels={c: levels[c] for c in pmap_class_indices(options)} if levels else None)
    lap("Parametric Map")
    sr = build_sr(analysis, None, segmentation, options, sources)
    lap("SR")
    for ds in (segmentation.dataset, *pmaps, sr):
        identify_result(ds, analysis.algorithm, sources[0])
    lap("identification")
    # the deflation the SEG and the map started: nobody writes them, and left running it
    # would slow the next run's stages
    discard()
    return times


def _timed(fn: Callable[[], T], runs: int) -> tuple[list[float], T]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return samples, out


def _profile(title: str, fn: Callable[[], object]) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    print(f"--- cProfile: {title}", file=sys.stderr)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(18)


def run_results_bench(source: Path | None, runs: int, workdir: Path | None = None,
                      seed: int = 1, profile: bool = False) -> BenchReport:
    from dicomnode.bench.receive import synth_dbt_files
    from dicomnode.results import build_results
    from dicomnode.results.encode import DEFLATER, discard, encode_result

    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-results-", dir=workdir))
    try:
        path = source or synth_dbt_files(tmp, seed)[0]
        analysis = bench_analysis(path)
        report = BenchReport("results", device="cpu", memory_kind="rss")
        if profile:
            _profile("build_results", lambda: build_results(analysis))
        def build_only():
            out = build_results(analysis)
            discard()  # the early deflation it started: nobody writes these
            return out

        def as_the_worker() -> None:
            for ds in build_results(analysis).datasets:
                encode_result(ds)

        samples, _ = _timed(as_the_worker, runs)
        report.add_timing("build_results + encode_result of each (as the worker)", samples)
        samples, built = _timed(build_only, runs)
        build_s = report.add_timing("build_results (SEG, PM, SR)", samples)
        stages = [stage_times(analysis) for _ in range(runs)]
        discard()
        for name in stages[0]:
            report.add_timing(f"build stage: {name}", [s[name] for s in stages])
        results = built.datasets
        total_old = total_new = 0.0
        for ds in results:
            kind = str(ds.Modality)
            if profile:
                _profile(f"encode_result {kind}", functools.partial(encode_result, ds))
            old_samples, old = _timed(functools.partial(_dcmwrite, ds), runs)
            new_samples, new = _timed(functools.partial(encode_result, ds), runs)
            old_s = report.add_timing(f"{kind}: pydicom dcmwrite", old_samples)
            new_s = report.add_timing(f"{kind}: encode_result", new_samples)
            total_old += old_s
            total_new += new_s
            row: dict = {"object": kind, "deflater": DEFLATER.__name__,
                         "frames": int(ds.get("NumberOfFrames", 1)),
                         "dcmwrite_s": old_s, "dcmwrite_bytes": sum(map(len, old)),
                         "encode_s": new_s, "encode_bytes": sum(map(len, new))}
            if ds.file_meta.TransferSyntaxUID.name.startswith("Deflated"):
                for level in LEVELS:
                    level_samples, out = _timed(
                        functools.partial(encode_result, ds, level=level), runs)
                    row[f"L{level}_s"] = report.add_timing(f"{kind}: level {level}",
                                                           level_samples)
                    row[f"L{level}_bytes"] = sum(map(len, out))
            report.rows.append(row)
            if kind != "SR":
                report.add_ratio(f"{kind}: dcmwrite / encode_result s", old_s / new_s,
                                 "pydicom dcmwrite")
        report.add_ratio("build + dcmwrite / build + encode_result s",
                         (build_s + total_old) / (build_s + total_new), "pydicom dcmwrite")
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
