"""dicomnode: a DICOM node that runs 3D-GMIC on breast imaging studies."""

__version__ = "0.1.0"
