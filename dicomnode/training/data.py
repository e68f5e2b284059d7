"""Labelled images from the archive index (or a folder of DICOM files), split by patient,
loaded, preprocessed as the worker does, and cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import SegmentationStorage

from dicomnode.errors import DicomnodeError
from dicomnode.ops.logs import kv
from dicomnode.pipeline.images import ImageHeader, read_pixels, scan_images
from dicomnode.training.labels import SPLITS, LabelRow, LabelsError
from gmic.classes import CLASS_NAMES

log = logging.getLogger("dicomnode.training")

CACHE_VERSION = 1


class DatasetError(DicomnodeError):
    """The labelled data cannot be used as asked (empty split, no positive cases, ...)."""


@dataclass
class Example:
    """One labelled image: what to load, its labels, and what the split needs."""

    header: ImageHeader
    benign: int
    malignant: int
    patient: str  # grouping key for the split (never logged)
    study_date: str  # YYYYMMDD or ""
    split: str = ""
    label_line: int = 0

    @property
    def uid(self) -> str:
        return self.header.uid

    @property
    def laterality(self) -> str:
        return self.header.laterality or ""

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.benign, self.malignant], dtype=np.float32)

    @property
    def breast_key(self) -> tuple[str, str]:
        return self.header.study_uid, self.laterality


@dataclass
class ImageIndex:
    """Scanned images plus the ground-truth SEG files found beside them."""

    headers: list[ImageHeader]
    seg_paths: list[Path] = field(default_factory=list)
    source: str = ""  # for messages: "the archive (DIR)" or "folder DIR"


# ------------------------------------------------------------------------------ indexing


def _seg_files(paths: Iterable[Path]) -> list[Path]:
    out = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # noqa: BLE001 - not DICOM: not a SEG either
            continue
        if str(ds.get("SOPClassUID", "")) == SegmentationStorage:
            out.append(p)
    return out


def index_folder(folder: str | Path) -> ImageIndex:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"images folder {folder} does not exist; pass a folder of DICOM "
                           "files (e.g. the output of `dicomnode synth`)")
    headers = scan_images([folder])
    segs = _seg_files(sorted(p for p in folder.rglob("*") if p.is_file()))
    return ImageIndex(headers, segs, f"folder {folder}")


def index_archive(store, rows: Sequence[LabelRow], labels_path: Path) -> ImageIndex:
    """Images of the studies the labels name, from the archive index. Rows keyed only by SOP
    Instance UID are looked up in the index to find their study."""
    from storage import StorageError

    studies = {r.study_uid for r in rows if r.study_uid}
    need = {r.sop_instance_uid: r for r in rows if r.sop_instance_uid and not r.study_uid}
    if need:
        found = store.studies_of_instances(list(need))
        for uid, row in need.items():
            if uid not in found:
                raise LabelsError(f"{labels_path} {row.where}: SOP instance {uid} is not in the "
                                  f"archive {store.archive.root}; import the images first "
                                  "(dicomnode import) or fix the row")
        studies |= set(found.values())
    files: list[Path] = []
    seg_paths: list[Path] = []
    for study_uid in sorted(studies):
        try:
            instances = store.study_instances(study_uid)
        except StorageError:
            row = next(r for r in rows if r.study_uid == study_uid)
            raise LabelsError(f"{labels_path} {row.where}: study {study_uid} is not in the "
                              f"archive {store.archive.root}; import it first or fix the row"
                              ) from None
        for inst in instances:
            (seg_paths if inst.sop_class_uid == SegmentationStorage else files).append(inst.path)
    headers = scan_images(files) if files else []
    return ImageIndex(headers, seg_paths, f"the archive {store.archive.root}")


def _patient_and_date(header: ImageHeader) -> tuple[str, str]:
    ds = pydicom.dcmread(header.slice_paths[0], stop_before_pixels=True,
                         specific_tags=["PatientID", "StudyDate"])
    return str(ds.get("PatientID", "") or ""), str(ds.get("StudyDate", "") or "")


# ------------------------------------------------------------------------------ matching


def match_labels(rows: Sequence[LabelRow], index: ImageIndex, modality: str | None,
                 labels_path: Path) -> list[Example]:
    """One Example per labelled image of the modality (None: all modalities).

    Image rows whose UID is not indexed raise LabelsError; rows for other modalities are
    skipped. A breast row labels every image of that breast in its study.
    """
    by_uid: dict[str, ImageHeader] = {}
    by_breast: dict[tuple[str, str], list[ImageHeader]] = defaultdict(list)
    for h in index.headers:
        for uid in h.sop_instance_uids:
            by_uid[uid] = h
        by_breast[(h.study_uid, h.laterality or "")].append(h)
    chosen: dict[str, tuple[ImageHeader, LabelRow]] = {}
    for row in rows:
        if row.sop_instance_uid:
            header = by_uid.get(row.sop_instance_uid)
            if header is None:
                raise LabelsError(f"{labels_path} {row.where}: SOP instance "
                                  f"{row.sop_instance_uid} is not among the images of "
                                  f"{index.source}; import it or fix the row")
            headers = [header]
        else:
            headers = by_breast.get((row.study_uid, row.laterality), [])
            if not headers:
                raise LabelsError(f"{labels_path} {row.where}: no images of study "
                                  f"{row.study_uid} laterality {row.laterality} in "
                                  f"{index.source}; import them or fix the row")
        for h in headers:
            if modality is not None and h.modality != modality:
                continue
            previous = chosen.get(h.uid)
            if previous is not None and (previous[1].benign, previous[1].malignant) != (
                    row.benign, row.malignant):
                raise LabelsError(f"{labels_path} {row.where}: image {h.uid} already has other "
                                  f"labels from line {previous[1].line}; make them agree")
            chosen.setdefault(h.uid, (h, row))
    examples = []
    for header, row in chosen.values():
        patient, date = row.patient_id, row.study_date
        if not patient or not date:
            found_patient, found_date = _patient_and_date(header)
            patient = patient or found_patient or header.study_uid
            date = date or found_date
        examples.append(Example(header, row.benign, row.malignant, patient, date, row.split,
                                row.line))
    if not examples:
        raise LabelsError(f"{labels_path}: no labelled {modality or ''} images in "
                          f"{index.source}; check --modality and the labels")
    examples.sort(key=lambda e: (e.header.study_uid, e.laterality, e.header.view, e.uid))
    return examples


# ------------------------------------------------------------------------------ splitting


def split_by_patient(examples: Sequence[Example],
                     fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                     ) -> dict[str, list[Example]]:
    """train / val / test by patient (paper III-A): patients in the chronological order of
    their most recent exam when every image has a date (else in a fixed pseudo-random
    order), the first fractions[0] to train, the next to val, the rest to test. A split
    column in the labels file overrides this for every row that has one."""
    if any(e.split for e in examples):
        out: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for e in examples:
            if not e.split:
                raise LabelsError(f"labels line {e.label_line}: some rows have a split and this "
                                  "one does not; give every row a split or none")
            out[e.split].append(e)
        return out
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise DatasetError(f"split fractions must be three non-negative numbers, got "
                           f"{fractions}")
    total = sum(fractions)
    by_patient: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_patient[e.patient].append(e)
    dated = all(e.study_date for e in examples)

    def order(patient: str) -> tuple[str, str]:
        digest = hashlib.sha256(patient.encode()).hexdigest()
        latest = max(e.study_date for e in by_patient[patient]) if dated else ""
        return latest, digest

    patients = sorted(by_patient, key=order)
    n = len(patients)
    cut1 = round(n * fractions[0] / total)
    cut2 = round(n * (fractions[0] + fractions[1]) / total)
    groups = {"train": patients[:cut1], "val": patients[cut1:cut2], "test": patients[cut2:]}
    return {name: [e for p in group for e in by_patient[p]] for name, group in groups.items()}


def check_split(name: str, examples: Sequence[Example], labels_path: Path,
                classes: Sequence[str] = ("malignant",)) -> None:
    """A split used for training or validation needs positive and negative cases."""
    if not examples:
        raise DatasetError(f"{labels_path}: the {name} split is empty; add labelled patients "
                           "or change --split")
    for cls in classes:
        positives = sum(getattr(e, cls) for e in examples)
        if positives == 0 or positives == len(examples):
            kind = "positive" if positives == 0 else "negative"
            raise DatasetError(f"{labels_path}: the {name} split has no {cls} {kind} cases "
                               f"({positives} positive of {len(examples)} images); add "
                               "labelled cases or change --split")


# ------------------------------------------------------------------------------ volumes


class CachedVolumes:
    """Examples as preprocessed model inputs (D, H, W) float32, the worker's preprocessing,
    cached on disk as float16 .npy keyed by image UID, file size and time, input size and
    whether the breast is read whole."""

    def __init__(self, examples: Sequence[Example], input_size: tuple[int, int],
                 cache_dir: str | Path | None,
                 masks: dict[str, dict[str, np.ndarray]] | None = None,
                 whole_breast: bool = False) -> None:
        """masks: ground-truth masks by source image UID (seg_masks); when given, items
        carry them on the model input as a third element, (2, H, W) benign, malignant
        (zeros for an image without a SEG: nothing to find there), and their depth maps as
        a fourth (NO_DEPTH outside the masks). whole_breast: read each image as the node
        does ([model] whole_breast), the window grown to the breast crop where that is larger
        than input_size, instead of a fixed-size window at the chest wall."""
        self.examples = list(examples)
        self.input_size = tuple(input_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.masks = masks
        self.whole_breast = whole_breast

    def __len__(self) -> int:
        return len(self.examples)

    def _cache_path(self, example: Example) -> Path | None:
        if self.cache_dir is None:
            return None
        first = example.header.slice_paths[0]
        st = first.stat()
        key = f"{CACHE_VERSION}|{example.uid}|{st.st_size}|{st.st_mtime_ns}|{self.input_size}"
        if self.whole_breast:  # the windowed key stays as it was: existing caches still hit
            key += "|whole"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.cache_dir / example.header.modality / f"{digest}.npy"

    def volume(self, index: int) -> np.ndarray:
        return self._load(index)[0]

    def _source_masks(self, example: Example) -> dict[str, np.ndarray] | None:
        if self.masks is None:
            return None
        return next((self.masks[u] for u in example.header.sop_instance_uids
                     if u in self.masks), None)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(volume, model-input masks and depths or None), from the cache when it has them."""
        from gmic.lesion_crops import NO_DEPTH
        from gmic.preprocess import preprocess

        example = self.examples[index]
        path = self._cache_path(example)
        mask_path = None if path is None else path.with_name(f"{path.stem}.masks.npy")
        depth_path = None if path is None else path.with_name(f"{path.stem}.depth.npy")
        want_masks = self.masks is not None
        if path is not None and path.is_file() and (
                not want_masks or (mask_path.is_file() and depth_path.is_file())):
            if not want_masks:
                return np.load(path).astype(np.float32), None, None
            return (np.load(path).astype(np.float32), np.load(mask_path).astype(np.float32),
                    np.load(depth_path).astype(np.float32))
        image = read_pixels(example.header)
        volume, transform = preprocess(image.pixels, image.modality, image.laterality,
                                       input_size=self.input_size,
                                       whole_breast=self.whole_breast)
        masks = depths = None
        if want_masks:
            source = self._source_masks(example)
            masks = np.zeros((2, *transform.input_shape), dtype=np.float32)
            depths = np.full((2, *transform.input_shape), NO_DEPTH, dtype=np.float32)
            for c, name in enumerate(CLASS_NAMES):
                if source is not None and source[name].shape == transform.source_shape[1:]:
                    masks[c] = transform.map_to_model(source[name].astype(np.float32))
                    inside = masks[c] > 0
                    depths[c][inside] = transform.map_to_model(source[f"{name}_depth"])[inside]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # DDP ranks share it
            np.save(tmp, volume.astype(np.float16))
            tmp.replace(path)
            volume = volume.astype(np.float16).astype(np.float32)  # same values as cached
            if masks is not None:
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.masks.npy")
                np.save(tmp, masks.astype(np.uint8))
                tmp.replace(mask_path)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.depth.npy")
                np.save(tmp, depths)
                tmp.replace(depth_path)
        return volume, masks, depths

    def __getitem__(self, index: int) -> tuple:
        volume, masks, depths = self._load(index)
        if self.masks is None:
            return volume, self.examples[index].labels
        return volume, self.examples[index].labels, masks, depths


def log_split(splits: dict[str, list[Example]]) -> None:
    for name, items in splits.items():
        log.info("event=split %s", kv(split=name, images=len(items),
                                      patients=len({e.patient for e in items}),
                                      malignant=sum(e.malignant for e in items),
                                      benign=sum(e.benign for e in items)))


# ------------------------------------------------------------------------------ SEG masks


def _segment_classes(ds) -> dict[int, str]:
    """Segment number -> "benign" / "malignant", by property code or label."""
    classes = {}
    for seg in ds.SegmentSequence:
        text = str(seg.get("SegmentLabel", "")).lower()
        code = ""
        if "SegmentedPropertyTypeCodeSequence" in seg:
            code = str(seg.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        if code == "86049000" or "malig" in text:
            classes[int(seg.SegmentNumber)] = "malignant"
        elif code == "3898006" or "benign" in text:
            classes[int(seg.SegmentNumber)] = "benign"
    return classes


def _source_frame(frame_group, single_source_frame: bool) -> int | None:
    """The 0-based source frame a SEG frame was derived from: its ReferencedFrameNumber, 0
    for a one-frame source, else unknown."""
    for derivation in frame_group.get("DerivationImageSequence", []) if frame_group else []:
        for source in derivation.get("SourceImageSequence", []):
            number = source.get("ReferencedFrameNumber")
            if number is not None:  # one frame, or the first of several
                return int(number[0] if isinstance(number, MultiValue) else number) - 1
    return 0 if single_source_frame else None


def seg_masks(seg_paths: Iterable[Path]) -> dict[str, dict[str, np.ndarray]]:
    """Ground-truth masks per referenced source image UID, max-projected over frames:
    {sop uid: {"benign": (H, W) bool, "malignant": (H, W) bool, "benign_depth": (H, W)
    float32, "malignant_depth": ...}} (paper VI-C). A depth map holds, where the class's
    mask is, the mean source frame (0-based) of the SEG frames covering the pixel: the slice
    the lesion is centred on there; NO_DEPTH where no mask is or the SEG does not say which
    source frame it was derived from."""
    from gmic.lesion_crops import NO_DEPTH

    out: dict[str, dict[str, np.ndarray]] = {}
    for path in seg_paths:
        ds = pydicom.dcmread(path)
        classes = _segment_classes(ds)
        pixels = ds.pixel_array
        if pixels.ndim == 2:
            pixels = pixels[None]
        shape = pixels.shape[1:]
        masks = {name: np.zeros(shape, bool) for name in CLASS_NAMES}
        frame_sum = {name: np.zeros(shape, np.float64) for name in CLASS_NAMES}
        frame_count = {name: np.zeros(shape, np.int32) for name in CLASS_NAMES}
        frames = ds.get("PerFrameFunctionalGroupsSequence", [])
        numbers = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   if "SegmentIdentificationSequence" in f else 1 for f in frames]
        numbers += [1] * (pixels.shape[0] - len(numbers))
        frames_per_segment = Counter(numbers)
        for i in range(pixels.shape[0]):
            cls = classes.get(numbers[i])
            if cls is None:
                continue
            inside = pixels[i] > 0
            masks[cls] |= inside
            frame = _source_frame(frames[i] if i < len(frames) else None,
                                  frames_per_segment[numbers[i]] == 1)
            if frame is not None:
                frame_sum[cls][inside] += frame
                frame_count[cls][inside] += 1
        for name in CLASS_NAMES:
            depth = np.full(shape, NO_DEPTH, np.float32)
            known = frame_count[name] > 0
            depth[known] = frame_sum[name][known] / frame_count[name][known]
            masks[f"{name}_depth"] = depth
        refs = [str(inst.ReferencedSOPInstanceUID)
                for series in ds.get("ReferencedSeriesSequence", [])
                for inst in series.get("ReferencedInstanceSequence", [])]
        for uid in refs:
            if uid in out:  # several slices of one series: one mask for the volume
                for key in masks:
                    out[uid][key] = np.maximum(out[uid][key], masks[key])
            else:
                out[uid] = {k: v.copy() for k, v in masks.items()}
    return out
