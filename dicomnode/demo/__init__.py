"""`dicomnode demo`: the node end to end on this machine, as a PACS would use it.

A synthetic study is generated and sent over DICOM (pynetdicom) to the node, started as
`dicomnode run` on 127.0.0.1; the SR, SEG and Parametric Maps it sends back are received,
summarised per breast and drawn as PNG overlays.

    report = run_demo(DemoOptions(out=Path("demo-out"), model_dir=Path("weights")), print)
"""

from dicomnode.demo.errors import DemoFailed, DemoSetupError
from dicomnode.demo.run import DemoOptions, DemoReport, run_demo

__all__ = ["DemoFailed", "DemoOptions", "DemoReport", "DemoSetupError", "run_demo"]
