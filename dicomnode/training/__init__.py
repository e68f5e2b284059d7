"""Training and evaluation data from the archive (or a folder): labels, patient-level
splits, preprocessed and cached model inputs. The model side is gmic.train / gmic.metrics."""
