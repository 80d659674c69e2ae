"""Shared test helpers: the pass contexts tests run pipelines with."""

from __future__ import annotations

from modelfold.passes.manager import PassContext

# The one quiet context: no progress lines and no re-capture after every pass (the slow part of a
# pass on a tiny model: ~1 s per capture), but every pass is still measured on the probe batch,
# so an exact pass that changes the logits fails.
QUIET = PassContext(log=None, verify=False)
# Silent and complete: every pass also re-captured and verified, as in a real run. Used by the
# tests that sweep every family (capture and verification is what they check there).
VERIFIED = PassContext(log=None)
