"""Shared test helpers: the pass contexts tests run pipelines with."""

from __future__ import annotations

from modelfold.passes.manager import PassContext

# The one quiet context: no progress lines, no re-capture after every pass, no probe measurement
# (tests that check verification or fidelity use LOGLESS, or their own context).
QUIET = PassContext(log=None, verify=False, measure=False)
# Silent but complete: every pass verified and measured, as in a real run.
LOGLESS = PassContext(log=None)
