"""Parsing of the external checkers' reports (the checkers themselves run in the other
test_results_* files under their markers)."""

from __future__ import annotations

from dicomnode.results.validate import dciodvfy_error_lines, sr_validator_error_lines

PIXELMED_CLEAN = """Found Comprehensive3DSR IOD
Found Root Template TID_1500 (MeasurementReport)
Warning: 1.9.1.5: /CONTAINER (126000,DCM,"Imaging Measurement Report"): Content Item not in template
Root Template Validation Complete
IOD validation complete
"""
PIXELMED_ERROR = """Found Comprehensive3DSR IOD
Found Root Template TID_1500 (MeasurementReport)
Error: Template 1500 MeasurementReport/[Row 1] CONTAINER CID 7021/[Row 4] CODE (121058,DCM,"Procedure reported"): 1.8: Code (71651007,SCT,"Mammography") not found in context group 100
Root Template Validation Complete
IOD validation complete
"""  # noqa: E501


def test_pixelmed_report_errors() -> None:
    assert sr_validator_error_lines(PIXELMED_CLEAN) == []
    assert len(sr_validator_error_lines(PIXELMED_ERROR)) == 1
    usage = "Usage: java com.pixelmed.validate.DicomSRValidator [-describe] filename\n"
    assert sr_validator_error_lines(usage) == [usage.strip()]
    assert sr_validator_error_lines("") == ["no output"]


def test_dciodvfy_report_errors() -> None:
    report = ("ParametricMap\nWarning - Unrecognized defined term <QUANTITY>\n"
              "Error - Missing attribute Type 2C Conditional Element=<Laterality>\n")
    assert dciodvfy_error_lines(report) == [
        "Error - Missing attribute Type 2C Conditional Element=<Laterality>"]
