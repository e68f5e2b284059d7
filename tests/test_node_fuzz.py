"""Seeded fuzzing of the receiver: a few hundred mutants of a synthetic study sent through a
real `dicomnode serve` over DICOM on 127.0.0.1.

Each mutant is one C-STORE on its own association. The contract checked:
- every C-STORE is answered with a standard status (PS3.4 B.2.3, PS3.7 C), with an Error
  Comment that is a valid LO, or the association is aborted cleanly; none is left without
  an answer;
- the node stays up (C-ECHO after every batch) and its memory stays bounded;
- archive and index agree: every acknowledged instance is indexed and on disk exactly as
  sent, every refused one is neither, and no archive file lacks its row;
- nothing is written outside data_dir (the node's $TMPDIR stays empty);
- no patient name or ID reaches the log, `dicomnode status` or the Prometheus metrics.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicomnode.config import load_config
from dicomnode.wiring import open_store
from tests.support.ops import NODE_AE, rss_mb
from tests.support.peers import NO_MODELS, free_port, node_process, write_config
from tests.support.synth import copy_study

PATIENT_NAME = "FUZZ^SECRETNAME"
PATIENT_ID = "FZ90210XQ"
SEED = 20261207
MUTANTS = 300

# Attributes whose absence or corruption the receiver must handle.
_ATTRIBUTES = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
    "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "FrameOfReferenceUID",
    "ImageLaterality", "ViewPosition", "Modality", "PixelSpacing", "ImagerPixelSpacing",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelData",
    "ViewCodeSequence", "PatientOrientation", "ImageType",
)
_NUMBERS = (0, 1, 7, 8, 15, 16, 17, 255, 256, 4095, 65535)
_STRINGS = ("", "X", "\\\\", "../../../etc/passwd", "Ä" * 80, "1" * 200, "MONOCHROME3",
            "RGB", "YBR_FULL", " L ", "B", "1.2.3..4", "1.2.abc", "0" * 70)
_TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
    JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian,
)


def _standard_status(status: int) -> bool:
    """C-STORE statuses PS3.4 B.2.3 and PS3.7 C define: success, warnings, failures."""
    return (status in (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007, 0x0110,
                       0x0111, 0x0117, 0x0122, 0x0124, 0x0210, 0x0211, 0x0212)
            or 0xA700 <= status <= 0xA7FF or 0xA900 <= status <= 0xA9FF
            or 0xC000 <= status <= 0xCFFF)


def _meta_end(data: bytes) -> int:
    return 132 + 12 + int.from_bytes(data[140:144], "little")


class Mutator:
    """Seeded mutants of the study's images, one file each, with the context to send on."""

    def __init__(self, sources: list[Path], out: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sources = [dcmread(p) for p in sources]
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def _fresh(self) -> Dataset:
        ds = copy.deepcopy(self.rng.choice(self.sources))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return ds

    def _write(self, ds: Dataset) -> Path | None:
        self.count += 1
        path = self.out / f"m{self.count:04d}.dcm"
        try:
            ds.save_as(path, enforce_file_format=False)
        except Exception:  # pydicom cannot write this mutant: not a case for the node
            path.unlink(missing_ok=True)
            return None
        return path

    # -- operators ----------------------------------------------------------------------

    def delete(self) -> tuple[str, Path | None]:
        ds = self._fresh()
        keyword = self.rng.choice(_ATTRIBUTES)
        if keyword in ds:
            delattr(ds, keyword)
        return f"delete {keyword}", self._write(ds)

    def number(self) -> tuple[str, Path | None]:
        ds = self._fresh()
        keyword = self.rng.choice(("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                                   "PixelRepresentation", "SamplesPerPixel"))
        value = self.rng.choice(_NUMBERS)
        setattr(ds, keyword, value)
        return f"{keyword}={value}", self._write(ds)

    def string(self) -> tuple[str, Path | None]:
        ds = self._fresh()
        keyword = self.rng.choice(("PhotometricInterpretation", "ImageLaterality",
                                   "ViewPosition", "Modality", "NumberOfFrames",
                                   "FrameOfReferenceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                   "StudyInstanceUID"))
        value = self.rng.choice(_STRINGS)
        try:
            setattr(ds, keyword, value)
        except Exception:
            return f"{keyword}={value[:12]!r} (unwritable)", None
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        return f"{keyword}={value[:12]!r}", self._write(ds)

    def functional_group(self) -> tuple[str, Path | None]:
        ds = self._fresh()
        seq = self.rng.choice(("SharedFunctionalGroupsSequence",
                               "PerFrameFunctionalGroupsSequence"))
        if seq not in ds or not len(ds[seq].value):
            return self.delete()
        item = self.rng.choice(list(ds[seq].value))
        keys = [e.keyword for e in item if e.keyword]
        if not keys:
            return f"{seq} empty item", self._write(ds)
        keyword = self.rng.choice(keys)
        delattr(item, keyword)
        return f"{seq} without {keyword}", self._write(ds)

    def transfer_syntax(self) -> tuple[str, Path | None]:
        """The meta names another transfer syntax; the body stays as it was encoded."""
        ds = self._fresh()
        path = self._write(ds)
        if path is None:
            return "transfer syntax", None
        data = path.read_bytes()
        syntax = self.rng.choice(_TRANSFER_SYNTAXES)
        ds.file_meta.TransferSyntaxUID = syntax
        body = data[_meta_end(data):]
        from io import BytesIO

        from pydicom.filewriter import write_file_meta_info
        buffer = BytesIO()
        buffer.write(data[:132])
        write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
        path.write_bytes(buffer.getvalue() + body)
        return f"meta says {syntax}", path

    def flip(self) -> tuple[str, Path | None]:
        path = self._write(self._fresh())
        if path is None:
            return "flip", None
        data = bytearray(path.read_bytes())
        start = _meta_end(data)
        end = min(len(data), start + 4096)
        flips = self.rng.randint(1, 16)
        for _ in range(flips):
            data[self.rng.randrange(start, end)] = self.rng.randrange(256)
        path.write_bytes(bytes(data))
        return f"{flips} bytes flipped in the header", path

    def truncate(self) -> tuple[str, Path | None]:
        path = self._write(self._fresh())
        if path is None:
            return "truncate", None
        data = path.read_bytes()
        at = self.rng.randrange(_meta_end(data) + 1, len(data))
        path.write_bytes(data[:at])
        return f"cut at {at} of {len(data)}", path

    def valid(self) -> tuple[str, Path | None]:
        return "valid control", self._write(self._fresh())

    def next(self) -> tuple[str, Path | None]:
        operators: list[Callable[[], tuple[str, Path | None]]] = [
            self.delete, self.delete, self.number, self.number, self.string,
            self.functional_group, self.transfer_syntax, self.flip, self.flip, self.truncate,
            self.valid]
        return self.rng.choice(operators)()


def _context_of(path: Path) -> tuple[str, str] | None:
    try:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except Exception:
        return None


def _send(port: int, path: Path, context: tuple[str, str]) -> str:
    """One C-STORE on its own association: "0x...." (its status), "aborted" (the node
    aborted the association cleanly), "refused association" or "no answer"."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(context[0], [context[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return "refused association"
    try:
        try:
            rsp = assoc.send_c_store(path)
        except (ValueError, AttributeError, KeyError, OSError) as exc:
            # our own SCU cannot build the request (e.g. an unreadable meta): not sent
            return f"not sent: {type(exc).__name__}"
        if rsp is not None and "Status" in rsp:
            return f"0x{int(rsp.Status):04X}"
        return "aborted" if assoc.is_aborted else "no answer"
    finally:
        if assoc.is_established:
            assoc.release()


def _echo(port: int) -> bool:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.slow
def test_seeded_mutants_get_standard_answers_and_leave_the_node_consistent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        synth_study) -> None:
    # the files are rewritten below: a private copy of the shared study
    study = copy_study(synth_study(studies=1, size="small", seed=31), tmp_path / "study")
    sources = []
    for path in sorted(study.glob("*/*/*.dcm")):
        if path.parent.name == "seg":
            continue
        ds = dcmread(path)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.save_as(path, enforce_file_format=True)
        sources.append(path)
    # DBT views are several MB: fuzz the 2D images three times as often.
    dbt = [p for p in sources if p.parent.name == "dbt"][:2]
    two_d = [p for p in sources if p.parent.name != "dbt"]
    mutator = Mutator(two_d * 3 + dbt, tmp_path / "mutants", SEED)

    port, http_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "node.toml", data_dir=data_dir, port=port,
                          peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1,
                                  "send_results": False}],
                          models=NO_MODELS, idle_seconds=3600,
                          extra=f'\n[http]\nlisten = "127.0.0.1:{http_port}"\n')
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(node_tmp))  # the node's; nothing may land there

    outcomes: list[tuple[str, Path, str]] = []
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, never re-encoded
    log_path = tmp_path / "node.log"
    try:
        with node_process(config, "serve", log_path=log_path, port=port) as node:
            for path in two_d[:4]:  # warm up: imports and first allocations
                _send(port, path, _context_of(path))
            rss_before = rss_mb(node.pid)
            while len(outcomes) < MUTANTS:
                name, path = mutator.next()
                context = _context_of(path) if path is not None else None
                if path is None or context is None:
                    continue
                outcomes.append((name, path, _send(port, path, context)))
                if len(outcomes) % 50 == 0:
                    assert node.poll() is None and _echo(port), f"node down after {name}"
            rss_after = rss_mb(node.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics",
                                        timeout=10) as rsp:
                metrics_text = rsp.read().decode()
            status = subprocess.run(
                [sys.executable, "-m", "dicomnode.cli", "--config", str(config), "status",
                 "--json", "--audit", "1000"],
                capture_output=True, text=True, timeout=120)
            assert node.poll() is None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous

    counts = Counter(result if result.startswith("0x") else result for *_, result in outcomes)
    print(f"\n{len(outcomes)} mutants: {dict(sorted(counts.items()))}; "
          f"node RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    bad = [(name, result) for name, _, result in outcomes
           if not (result == "aborted" or result.startswith("not sent")
                   or (result.startswith("0x") and _standard_status(int(result, 16))))]
    assert bad == [], bad[:20]
    # Error Comment is LO: one value of at most 64 characters (pynetdicom warns otherwise)
    malformed = [r.getMessage() for r in caplog.records if "ErrorComment" in r.getMessage()]
    assert malformed == [], malformed[:5]
    assert sum(r.startswith("0x") for *_, r in outcomes) >= MUTANTS * 0.8, counts
    # the fuzzing reaches both sides: stored instances and refusals of more than one kind
    assert counts["0x0000"] > 0 and len([c for c in counts if c.startswith("0x")]) >= 3, counts
    assert rss_after - rss_before < 200, f"RSS {rss_before:.0f} -> {rss_after:.0f} MB"

    # archive and index agree with what was acknowledged
    store = open_store(load_config(config))
    try:
        indexed: dict[str, Path] = {}
        for job in store.list_jobs(limit=10_000):
            for instance in store.study_instances(job.study_uid):
                indexed[instance.sop_instance_uid] = Path(instance.path)
    finally:
        store.close()
    for name, path, result in outcomes:
        meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
        uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
        if result == "0x0000":
            assert uid in indexed, f"{name}: acknowledged but not indexed"
            assert indexed[uid].read_bytes()[_meta_end(indexed[uid].read_bytes()):] == \
                path.read_bytes()[_meta_end(path.read_bytes()):], f"{name}: stored bytes differ"
    acknowledged = {str(dcmread(p, stop_before_pixels=True, force=True).file_meta
                        .MediaStorageSOPInstanceUID) for _, p, r in outcomes if r == "0x0000"}
    warm_up = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in two_d[:4]}
    assert set(indexed) <= acknowledged | warm_up, "refused instances were indexed"
    archive = data_dir / "archive"
    on_disk = {p.resolve() for p in archive.rglob("*.dcm") if ".tmp" not in p.parts}
    assert on_disk == {p.resolve() for p in indexed.values()}, "archive files without rows"
    assert list(node_tmp.rglob("*")) == [], "files written outside data_dir"

    for where, text in (("log", log_path.read_text(errors="replace")),
                        ("status", status.stdout + status.stderr), ("metrics", metrics_text)):
        for secret in (PATIENT_NAME, PATIENT_ID, "SECRETNAME"):
            assert secret not in text, f"{secret!r} in the node's {where}"
    assert json.loads(status.stdout)  # status answered while the node was being fuzzed
