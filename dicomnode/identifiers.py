"""One home for the DICOM identifiers the node uses: the SOP classes and transfer syntaxes it
receives, checks, writes and sends.

A single UID is pydicom's name for it (``pydicom.uid.SegmentationStorage``, ...), imported
from pydicom.uid where it is used. What pydicom does not name, and the groups of UIDs the
node acts on, are defined here once. No other module writes a "1.2.840.10008..." literal.
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
    BreastTomosynthesisImageStorage,
    Comprehensive3DSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    KeyObjectSelectionDocumentStorage,
    MammographyCADSRStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    ParametricMapStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

# --- Not named by pydicom.uid ------------------------------------------------------------

# Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3).
STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")

# Roots of SOP classes that are not images to run the model on: results (SEG, PM, SR, KO,
# PR), RT, encapsulated documents, waveforms, raw data, registrations, DICOMDIR. Prefixes,
# matched with str.startswith.
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, SEG, surface
    "1.2.840.10008.5.1.4.1.1.30",  # parametric map
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, KO
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)

# --- Images the node receives and processes ------------------------------------------------

# Breast image SOP classes the node processes, in the order the SCP offers them.
BREAST_IMAGE_SOP_CLASSES = (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
    # single-frame classes some vendors use for DBT slices. (Before issue 18 these two were
    # labelled "Digital X-Ray - For Presentation / For Processing"; the UIDs, kept as they
    # were, are Computed Radiography and Digital X-Ray - For Presentation.)
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

# 2D breast images: digital mammography and breast projection, for presentation/processing.
BREAST_PROJECTION_SOP_CLASSES = frozenset({BreastProjectionXRayImageStorageForPresentation,
                                           BreastProjectionXRayImageStorageForProcessing})
MAMMOGRAPHY_2D_SOP_CLASSES = frozenset({DigitalMammographyXRayImageStorageForPresentation,
                                        DigitalMammographyXRayImageStorageForProcessing,
                                        *BREAST_PROJECTION_SOP_CLASSES})

# IODs whose Image Pixel module is greyscale only (MONOCHROME1/2, one sample): DBT, digital
# mammography, breast projection, and the two single-frame X-ray classes above.
GREYSCALE_SOP_CLASSES = frozenset({BreastTomosynthesisImageStorage,
                                   *MAMMOGRAPHY_2D_SOP_CLASSES,
                                   ComputedRadiographyImageStorage,
                                   DigitalXRayImageStorageForPresentation})

# What images arrive in: uncompressed, and the compressed syntaxes modalities and PACS use
# (the order the SCP offers them in).
RECEIVED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, still sent by old devices
]

# Encapsulated syntaxes by codec: what the first fragment of a received frame must start as.
JPEG2000_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL,
                               HTJ2K})
JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                           JPEGLSLossless, JPEGLSNearLossless})

# --- Results the node writes and sends -------------------------------------------------------

# The result objects by the node's name for their kind (jobs, logs, `dicomnode jobs`).
RESULT_KINDS: dict[str, str] = {
    Comprehensive3DSRStorage: "sr",
    SegmentationStorage: "seg",
    ParametricMapStorage: "pmap",
    MammographyCADSRStorage: "cad-sr",
}

# Result SOP classes the SCU proposes first (pynetdicom's storage contexts lack Parametric
# Map); Key Object Selection carries IOCM rejection notes.
RESULT_SOP_CLASSES = (ParametricMapStorage, SegmentationStorage, Comprehensive3DSRStorage,
                      MammographyCADSRStorage, KeyObjectSelectionDocumentStorage)
# Results the node may write deflated (ResultOptions.deflate): proposed in a context of
# their own with deflate alone, so a peer that takes it cannot pick Explicit VR instead.
DEFLATABLE_SOP_CLASSES = (ParametricMapStorage, SegmentationStorage)
