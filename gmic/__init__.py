"""3D-GMIC and 2D GMIC (Park et al.), pure torch + numpy: no DICOM here."""
