"""modelfold IR: ``Program`` around ``torch.export``, architecture description, verification."""

from modelfold.ir.architecture import Architecture, UnsupportedArchitectureError, describe
from modelfold.ir.capture import CaptureError, ExportSpec, capture
from modelfold.ir.program import PassRecord, Program
from modelfold.ir.verify import VerificationError, verify

__all__ = ["Architecture", "CaptureError", "ExportSpec", "PassRecord", "Program",
           "UnsupportedArchitectureError", "VerificationError", "capture", "describe", "verify"]
