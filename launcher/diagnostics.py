"""What to tell the user when training ends in an error, without a traceback where one would only bury the point:
bad data (file and line), a checkpoint the storage refused, a run that stopped itself, and above all a collective
whose peer stopped answering, named by the collective, the line of ours that called it, and the timeout.
"""

from __future__ import annotations

import os
import re
import traceback

import torch.distributed as dist

_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
_FUNCOL_FILE = os.path.join("torch", "distributed", "_functional_collectives.py")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PEER_TROUBLE = r"time[sd]? ?out|connection|closed|reset by peer|broken pipe|/gloo/|nccl"


def failure_message(error: BaseException, timeout_minutes: float) -> str | None:
    """What to tell the user, without a traceback, about an error that ended training: bad data (file and line),
    a checkpoint the storage refused (file and OS error), a collective whose peer stopped answering (which
    collective, and the timeout). None for anything else, whose traceback is more use."""
    # Imported here: a worker reads this module before its recipe is checked, and these pull in the engines.
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import TrainingStopped

    if isinstance(error, (DataError, CheckpointError, TrainingStopped)):
        return str(error)
    return describe_collective_failure(error, timeout_minutes)


def describe_collective_failure(error: BaseException, timeout_minutes: float) -> str | None:
    """A message for a collective that failed because a peer stopped answering (it hangs, was stopped or died):
    which collective, called from where, and why. None when ``error`` did not come from a collective."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not (
        isinstance(error, dist.DistError) or re.search(_PEER_TROUBLE, text, re.IGNORECASE)
    ):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    # The outermost torch.distributed call is the collective the caller asked for (broadcast_object_list, not the
    # broadcast inside it).
    at = next((i for i, f in enumerate(frames) if f.filename.endswith(_C10D_FILE)), None)
    funcol = next((i for i, f in enumerate(frames) if f.filename.endswith(_FUNCOL_FILE)), None)
    if at is None and funcol is not None:
        # DTensor collectives (a gradient norm, full_tensor) are issued and waited deep inside torch: name the
        # public torch function that our code called.
        ours_at = max((i for i, f in enumerate(frames[:funcol]) if f.filename.startswith(_PACKAGE_DIR + os.sep)),
                      default=-1)  # fmt: skip
        at = next((i for i in range(ours_at + 1, funcol) if not frames[i].name.startswith("_")), funcol)
    if at is None and not isinstance(error, dist.DistError) and "/gloo/" not in text:
        return None
    what = f"collective {frames[at].name}" if at is not None else "a collective"
    callers = frames[:at]
    ours = next((f for f in reversed(callers) if f.filename.startswith(_PACKAGE_DIR + os.sep)), None)
    library = next((f for f in reversed(callers) if f"{os.sep}site-packages{os.sep}" in f.filename
                    and f"{os.sep}torch{os.sep}" not in f.filename), None)  # fmt: skip
    if ours is not None:
        what += f" in {_short(ours.filename)}:{ours.lineno} ({ours.name})"
    if library is not None and (ours is None or callers.index(library) > callers.index(ours)):
        what += f", via {_short(library.filename)}:{library.lineno} ({library.name})"
    detail = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    detail = re.sub(r"^\[[^\]]*:\d+\]\s*", "", detail)  # the C++ source position gloo puts first
    setting = f"parallel.timeout_minutes={timeout_minutes:g}"
    if re.search(r"time[sd]? ?out", detail, re.IGNORECASE):
        why = (
            f"timed out after {timeout_minutes * 60:g} s ({setting}): a peer rank stopped answering (it hangs, was "
            "stopped, or died without closing its connections)"
        )
    else:
        why = f"failed: a peer rank went away (it exited or died); collectives wait up to {setting} for peers"
    return f"{what} {why}: {detail}"


def _short(filename: str) -> str:
    """A source path from its package directory on: ``launcher/loop.py``, ``deepspeed/runtime/engine.py``."""
    parts = filename.split(os.sep)
    if filename.startswith(_PACKAGE_DIR + os.sep):
        return os.path.relpath(filename, os.path.dirname(_PACKAGE_DIR))
    if "site-packages" in parts:
        return os.sep.join(parts[len(parts) - parts[::-1].index("site-packages") :])
    return filename
