"""Offline checkers of result objects: dciodvfy (dicom3tools), DicomSRValidator (PixelMed),
dsrdump (dcmtk). Each returns the lines that report errors; an empty list means clean.

The tools print warnings too (dciodvfy warns about optional attributes, PixelMed about
content item order in some templates); only lines that say "Error" count.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# PixelMed evaluates templates as XPath; the JDK's default expression limits stop it early.
_JAVA_XPATH_LIMITS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                      "-Djdk.xml.xpathTotalOpLimit=0")


class ValidatorMissingError(RuntimeError):
    """The external checker is not installed."""


def _run(argv: list[str], timeout: float) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except FileNotFoundError as exc:
        raise ValidatorMissingError(f"{argv[0]} is not installed") from exc
    return proc.stdout + proc.stderr


def dciodvfy_output(path: str | Path, timeout: float = 120) -> str:
    """Full dciodvfy report of one file. dciodvfy (dicom3tools 1.00) cannot read the
    Deflated Explicit VR Little Endian transfer syntax: such a file is checked as the same
    dataset written uncompressed (deflate is a lossless encoding of the whole dataset)."""
    if not shutil.which("dciodvfy"):
        raise ValidatorMissingError("dciodvfy is not installed (Debian package dicom3tools)")
    with _inflated(path) as readable:
        return _run(["dciodvfy", str(readable)], timeout)


class _inflated:
    """Context manager: `path`, or an Explicit VR Little Endian copy of it when deflated."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        import pydicom
        from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

        try:
            meta = pydicom.filereader.read_file_meta_info(self.path)
        except Exception:  # not a DICOM file: let the tool say so
            return self.path
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return self.path
        ds = pydicom.dcmread(self.path)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        self.tmp = tempfile.TemporaryDirectory(prefix="dicomnode-inflated-")
        out = Path(self.tmp.name) / self.path.name
        ds.save_as(out, enforce_file_format=True)
        return out

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def instance_validator_output(path: str | Path, timeout: float = 300) -> str:
    """Full report of PixelMed's DicomInstanceValidator (IOD and module rules)."""
    java = shutil.which("java")
    if not PIXELMED_JAR.exists() or not java:
        raise ValidatorMissingError(
            f"PixelMed DicomInstanceValidator needs {PIXELMED_JAR} and java "
            "(Debian package pixelmed-apps)")
    return _run([java, *_JAVA_XPATH_LIMITS, "-cp", str(PIXELMED_JAR),
                 "com.pixelmed.validate.DicomInstanceValidator", str(path)], timeout)


def dciodvfy_error_lines(report: str) -> list[str]:
    """The lines of a dciodvfy report that begin with "Error" (warnings are left out)."""
    return [line for line in report.splitlines() if line.startswith("Error")]


def dciodvfy_errors(path: str | Path, timeout: float = 120) -> list[str]:
    """dciodvfy's error lines for one file ([] when it is valid)."""
    return dciodvfy_error_lines(dciodvfy_output(path, timeout))


def sr_validator_output(path: str | Path, timeout: float = 300) -> str:
    """Full report of PixelMed's DicomSRValidator with content-item-order and template checks."""
    java = shutil.which("java")
    if not PIXELMED_JAR.exists() or not java:
        raise ValidatorMissingError(
            f"PixelMed DicomSRValidator needs {PIXELMED_JAR} and java "
            "(Debian package pixelmed-apps)")
    return _run([java, *_JAVA_XPATH_LIMITS, "-cp", str(PIXELMED_JAR),
                 "com.pixelmed.validate.DicomSRValidator", "-checkcontentitemorder",
                 "-checktemplateid", str(path)], timeout)


def sr_validator_error_lines(report: str) -> list[str]:
    """The error lines of a DicomSRValidator report ("Error: ..."); a report that never
    says its validation completed (a Java exception, a usage message) is an error too."""
    lines = report.splitlines()
    errors = [line for line in lines if line.lstrip().startswith("Error")]
    if not errors and "IOD validation complete" not in report:
        errors = [line for line in lines if line.strip()][-3:] or ["no output"]
    return errors


def sr_validator_errors(path: str | Path, timeout: float = 300) -> list[str]:
    """DicomSRValidator's error lines for one SR ([] when it is valid). About a minute a
    file on two cores: the template rules are a large XSLT."""
    return sr_validator_error_lines(sr_validator_output(path, timeout))


def dsrdump_output(path: str | Path, timeout: float = 60) -> str:
    """dsrdump's rendering of an SR document (raises ValueError when it cannot read it)."""
    if not shutil.which("dsrdump"):
        raise ValidatorMissingError("dsrdump is not installed (Debian package dcmtk)")
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise ValueError(f"dsrdump could not read {path}: {proc.stderr.strip()}")
    return proc.stdout


def dsrdump_errors(path: str | Path, timeout: float = 60) -> list[str]:
    """dsrdump's error lines ("E: ..."/"F: ...") or its failure message."""
    if not shutil.which("dsrdump"):
        raise ValidatorMissingError("dsrdump is not installed (Debian package dcmtk)")
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if line.startswith(("E:", "F:"))]
    if proc.returncode != 0 and not lines:
        lines = [f"dsrdump exited with {proc.returncode}: {proc.stderr.strip()}"]
    return lines
