"""modelfold IR: ``Program`` around ``torch.export``, architecture description, verification."""

from modelfold.ir.architecture import Architecture, UnsupportedArchitectureError, describe
from modelfold.ir.capture import CaptureError, capture
from modelfold.ir.program import PassRecord, Program
from modelfold.ir.signature import Signature, signature_for
from modelfold.ir.verify import VerificationError, verify

__all__ = ["Architecture", "CaptureError", "PassRecord", "Program", "Signature",
           "UnsupportedArchitectureError", "VerificationError", "capture", "describe",
           "signature_for", "verify"]
