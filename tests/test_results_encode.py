"""encode_result writes what pydicom's dcmwrite writes: the same file meta and, inflated,
the same dataset bytes, for every result object (deflated or not), at any level and block
size; and the same bytes on every run whatever the number of threads."""

from __future__ import annotations

import io
import zlib

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomnode.results import ResultOptions, build_results
from dicomnode.results.encode import encode_result, encode_result_bytes
from tests.support.results import analysis_for


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, the rest) of a Part 10 file."""
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[:meta_end], data[meta_end:]


@pytest.mark.parametrize("modality", ["dbt", "ffdm"])
@pytest.mark.parametrize("values", ["float", "integer"])
def test_same_dataset_as_dcmwrite(tmp_path_factory, modality, values):
    analysis = analysis_for(tmp_path_factory, "enhanced", modality)
    options = ResultOptions(pmap_values=values, pmap_classes=("benign", "malignant"))
    results = build_results(analysis, None, options)
    deflated = 0
    for ds in results.datasets:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        old = buffer.getvalue()
        for level, block in ((1, 1 << 20), (6, 4096), (9, 777)):
            new = encode_result_bytes(ds, level=level, block=block)
            if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
                old_meta, old_body = _split(old)
                new_meta, new_body = _split(new)
                assert new_meta == old_meta
                assert len(new_body) % 2 == 0
                assert zlib.decompress(new_body, -zlib.MAX_WBITS) == \
                    zlib.decompress(old_body, -zlib.MAX_WBITS)
            else:
                assert new == old
            read = dcmread(io.BytesIO(new))
            assert read == dcmread(io.BytesIO(old))
            if "FloatPixelData" in read or "PixelData" in read:
                assert (read.pixel_array == dcmread(io.BytesIO(old)).pixel_array).all()
        deflated += ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert deflated == 3  # the SEG and two maps


def test_same_bytes_whatever_the_threads(tmp_path_factory):
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    pm = build_results(analysis).pmaps[0]
    one = encode_result(pm, threads=1, block=4096)
    assert len(one) > 3  # several blocks
    assert encode_result(pm, threads=3, block=4096) == one


def test_zlib_ng_deflates_where_installed(tmp_path_factory):
    """zlib-ng (a dependency) deflates the results; its stream and zlib's inflate to the
    same dataset, at every level, split into blocks or not."""
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    from dicomnode.results import encode

    assert encode.DEFLATER is zlib_ng
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    pm = build_results(analysis).pmaps[0]
    for level, block in ((1, 4096), (6, 1 << 20), (9, 777)):
        fast = encode_result_bytes(pm, level=level, block=block)
        plain = encode_result_bytes(pm, level=level, block=block, deflater=zlib)
        assert fast != plain  # another deflater, another stream ...
        fast_meta, fast_body = _split(fast)
        plain_meta, plain_body = _split(plain)
        assert fast_meta == plain_meta  # ... of the same dataset
        assert zlib.decompress(fast_body, -zlib.MAX_WBITS) == \
            zlib.decompress(plain_body, -zlib.MAX_WBITS)


def test_bench_results_on_a_small_image(tmp_path_factory):
    from dicomnode.bench.results import run_results_bench
    from tests.support.results import findings, study_root

    root = study_root(tmp_path_factory, "enhanced")
    report = run_results_bench(root / findings(root, "dbt")[0]["path"], runs=1,
                               workdir=tmp_path_factory.mktemp("bench"))
    rows = {row["object"]: row for row in report.rows}
    assert set(rows) == {"SEG", "OT", "SR"}
    assert rows["OT"]["L1_bytes"] >= rows["OT"]["L9_bytes"] > 0
    assert rows["SR"]["encode_bytes"] == rows["SR"]["dcmwrite_bytes"]
    assert any(r.name.startswith("build + dcmwrite") for r in report.ratios)
    stages = [t.name for t in report.timings if t.name.startswith("build stage: ")]
    assert stages == [f"build stage: {name}" for name in (
        "source headers", "saliency levels (both classes)", "SEG", "Parametric Map", "SR",
        "identification")]


@pytest.mark.parametrize("level", [0, 10, "1"])
def test_deflate_level_out_of_range_is_a_config_error(level):
    from dicomnode.config import Config, validate
    from dicomnode.errors import ConfigError

    config = Config()
    config.results.deflate_level = level
    with pytest.raises(ConfigError, match="deflate_level"):
        validate(config)


def test_early_deflation_is_taken_and_gives_the_same_stream(tmp_path_factory, monkeypatch):
    """The blocks deflate_early started are the ones encode_result writes, when it writes
    the same pixel bytes at the same level and block size; at another level they are not
    used. Either way the bytes are those of a deflation from scratch."""
    from dicomnode.results import encode

    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    pm = build_results(analysis).pmaps[0]
    value = pm.FloatPixelData
    scratch = {level: encode_result_bytes(pm, level=level, block=4096) for level in (1, 6)}
    taken: list[dict] = []
    take = encode._take_early
    monkeypatch.setattr(encode, "_take_early", lambda *args: taken.append(take(*args))
                        or taken[-1])
    started = encode.deflate_early(value, 6, block=4096)
    assert started == -(-len(value) // 4096) - 2 > 0
    assert encode_result_bytes(pm, level=6, block=4096) == scratch[6]
    assert len(taken[-1]) == started  # all taken ...
    assert encode_result_bytes(pm, level=6, block=4096) == scratch[6]
    assert taken[-1] == {}  # ... once
    encode.deflate_early(value, 6, block=4096)
    assert encode_result_bytes(pm, level=1, block=4096) == scratch[1]
    assert taken[-1] == {}  # another level: deflated anew
    encode.deflate_early(value, 6, block=4096)
    encode.deflate_early(value + b"", 6, block=4096)  # a copy, not the same object
    encode.discard()
    assert encode_result_bytes(pm, level=6, block=4096) == scratch[6]


def test_maps_and_segs_start_deflating_when_built(tmp_path_factory, monkeypatch):
    """build_results starts the deflation of the map's and the SEG's pixel data at the
    options' level, before the SR is built."""
    from dicomnode.results import pmap, seg

    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    started: list[tuple[bytes, int]] = []
    for module in (pmap, seg):
        monkeypatch.setattr(module, "deflate_early",
                            lambda value, level: started.append((value, level)))
    results = build_results(analysis, None, ResultOptions(deflate_level=3))
    assert [(v is results.seg.PixelData, level) for v, level in started[:1]] == [(True, 3)]
    assert [(v is results.pmaps[0].FloatPixelData, level) for v, level in started[1:]] == \
        [(True, 3)]
    started.clear()
    build_results(analysis, None, ResultOptions(deflate=False))
    assert started == []
    with pytest.raises(ValueError, match="deflate_level"):
        ResultOptions(deflate_level=0)


def test_early_deflation_works_in_a_forked_child(tmp_path_factory):
    """A process forked after early deflation started gets threads of its own."""
    import multiprocessing

    from dicomnode.results import encode

    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    pm = build_results(analysis).pmaps[0]
    assert encode.deflate_early(pm.FloatPixelData, 6, block=4096) > 0  # threads started
    expected = encode_result_bytes(pm, level=6, block=4096)

    def child(queue):
        encode.deflate_early(pm.FloatPixelData, 6, block=4096)
        queue.put(encode_result_bytes(pm, level=6, block=4096) == expected)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    assert queue.get(timeout=60) is True
    process.join(timeout=60)


def test_bytes_array_fills_a_bytes_object_in_place(monkeypatch):
    """BytesArray's array writes into the bytes object finish() returns (no copy), on huge
    pages where it is large; small ones are plain copies."""
    import numpy as np

    from dicomnode.results import buffers

    advised: list[int] = []
    monkeypatch.setattr(buffers, "_huge_pages", lambda address, size: advised.append(size))
    out = buffers.BytesArray((4, 1024, 1024), np.float32)
    out.array[:] = 0.5
    out.array[3, -1, -1] = 2.0
    data = out.finish()
    assert type(data) is bytes and len(data) == 16 * 1024 * 1024
    assert advised == [len(data)]
    values = np.frombuffer(data, np.float32)
    assert values[0] == 0.5 and values[-1] == 2.0 and (values[:-1] == 0.5).all()
    small = buffers.BytesArray((3,), np.uint16)
    small.array[:] = [1, 2, 3]
    assert small.finish() == np.array([1, 2, 3], np.uint16).tobytes()
    assert advised == [len(data)]
