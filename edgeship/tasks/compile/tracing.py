"""One lock around torch's graph capture (torch.export, torch.jit.trace, FX), shared by the compile targets.

The release flow compiles its targets in parallel Prefect tasks, which are threads of
one process, and torch's graph capture is not thread-safe: two `torch.export.export`
calls at once fail with "AssertionError: Trying to pop empty mode stack", and FX
tracing (QAT, coremltools' LinearQuantizer) patches `nn.Module.__call__` process-wide,
so a forward pass or an export in another thread meanwhile fails with "NameError: module
is not installed as a submodule" (both seen with torch 2.13). Compile steps that run
torch (capture, trace, or a forward pass for a proxy metric) hold the lock. Targets hold `TORCH_CAPTURE` while they capture or trace a model and let
it go before the long part that runs elsewhere (a converter subprocess), so the
targets still overlap where it matters.

    >>> with TORCH_CAPTURE:
    ...     program = torch.export.export(model, (example,))
"""

from __future__ import annotations

import threading

TORCH_CAPTURE = threading.RLock()
