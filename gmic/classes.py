"""The model's classes and their order, the one definition every part of the project uses.

The network's outputs, the training labels and masks, the evaluation tables and the result
objects all hold the classes in this order: index 0 benign, index 1 malignant. A DICOM SEG
numbers its segments from 1, in the same order (segment 1 benign, 2 malignant). Plain
Python: importing this module imports no torch.
"""

from __future__ import annotations

CLASS_NAMES = ("benign", "malignant")
BENIGN, MALIGNANT = 0, 1  # indices into CLASS_NAMES, the model's outputs, labels and masks

# SEG segment numbers (1-based), as the synthetic ground truth and the model's SEG use them;
# also the label values of the synthetic label maps (0: no lesion).
BENIGN_SEGMENT, MALIGNANT_SEGMENT = BENIGN + 1, MALIGNANT + 1
