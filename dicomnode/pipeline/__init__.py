"""From archived DICOM images to the model's results: load the images as model-ready arrays
(images), pick the weights (weights), run the model (inference, analysis), and the worker
that takes a ready study through these stages and queues the results for delivery."""
