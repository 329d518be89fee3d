"""Test-wide setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this happens at collection
time, before any test module imports ngtriton.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the fault-injection totals that tests/test_faults.py recorded (if it ran)."""
    import sys

    records = [getattr(mod, "FAULT_RECORD", None) for name, mod in list(sys.modules.items())
               if name.rsplit(".", 1)[-1] == "test_faults"]
    records = [r for r in records if isinstance(r, dict) and r.get("tried")]
    if not records:
        return
    rec = records[0]
    lost = rec["lost"]
    lost_text = "none" if not lost else f"{len(lost)} ({'; '.join(lost)})"
    terminalreporter.write_line(
        f"fault injection: {len(rec['tried'])} faults tried, {len(rec['survived'])} survived, "
        f"parameters lost: {lost_text}")
