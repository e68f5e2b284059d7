"""The de-identified export: a training set from the archive (training_set) and the
de-identification it applies (deidentify)."""
