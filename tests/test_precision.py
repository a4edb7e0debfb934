"""TF32 in products: off unless opted in, torch's flags restored exactly (dropflat.precision).

The flags are process-wide and, on torch >= 2.9, kept twice (legacy flags and
``fp32_precision`` strings that can disagree), so the restore is checked in a
child process over a sequence of starting states, each reached by a user's
setter on top of the last; in-process tests only use states they undo.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dropflat
from dropflat.operators import LinearOperator
from dropflat.precision import allow_tf32, tf32_allowed

HAS_NEW_API = isinstance(getattr(torch.backends.cuda.matmul, "fp32_precision", None), str)


def flags():
    """What a product sees: the legacy flags (the new API's effective values on torch >= 2.9)."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


class FlagProbe(LinearOperator):
    """An operator on a non-CPU device (``meta``: needs no GPU) that records the flags its products run under."""

    def __init__(self, n=3, fail=False):
        self.shape, self.dtype, self.device = (n, n), torch.float32, torch.device("meta")
        self.seen, self.fail = [], fail

    def _matmat(self, V):
        self.seen.append(flags())
        if self.fail:
            raise RuntimeError("product failed")
        return V


def test_products_run_without_tf32_and_restore_the_users_flags(users_tf32):
    op = FlagProbe()
    op.matvec(torch.ones(3))
    op.matmat(torch.ones(3, 2))
    assert op.seen == [(False, False), (False, False)]
    assert flags() == (True, True)


def test_flags_restored_after_an_exception(users_tf32):
    op = FlagProbe(fail=True)
    with pytest.raises(RuntimeError, match="product failed"):
        op.matmat(torch.ones(3, 2))
    assert op.seen == [(False, False)]
    assert flags() == (True, True)


def test_opt_in_follows_torch_flags(users_tf32):
    op = FlagProbe()
    with dropflat.allow_tf32():
        assert tf32_allowed()
        op.matvec(torch.ones(3))
        with allow_tf32(False):  # nested opt-out
            op.matvec(torch.ones(3))
        op.matvec(torch.ones(3))
    assert not tf32_allowed()
    assert op.seen == [(True, True), (False, False), (True, True)]
    torch.backends.cuda.matmul.allow_tf32 = False  # opted in, the user's own setting is what runs
    with dropflat.allow_tf32():
        op.matvec(torch.ones(3))
    assert op.seen[-1] == (False, True)


def test_cpu_products_leave_the_flags_alone(users_tf32):
    seen = []

    class CpuProbe(FlagProbe):
        def __init__(self):
            super().__init__()
            self.device = torch.device("cpu")

    op = CpuProbe()
    op.seen = seen
    op.matvec(torch.ones(3))
    assert seen == [(True, True)]


# Each line: a user's setter, applied on top of the previous state; then the
# child snapshots every getter (an error is part of the state), runs tf32_off
# around a check that TF32 is off, and compares the snapshot after.
_SCENARIOS = [
    "pass",
    "torch.backends.cuda.matmul.allow_tf32 = True",
    "torch.backends.cudnn.allow_tf32 = False",
    "torch.set_float32_matmul_precision('high')",
    "torch.set_float32_matmul_precision('medium')",
    "torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = True",
]
_NEW_API_SCENARIOS = [
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'",  # the APIs now disagree for matmul
    "torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    "torch.backends.fp32_precision = 'tf32'",
    "torch.backends.fp32_precision = 'none'; torch.backends.cudnn.rnn.fp32_precision = 'tf32'",
]

_CHILD = textwrap.dedent("""
    import json, sys, torch
    from dropflat.precision import tf32_off
    b = torch.backends
    GETTERS = {
        "matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": lambda: b.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "fp32_precision": lambda: b.fp32_precision,
        "cuda.matmul.fp32_precision": lambda: b.cuda.matmul.fp32_precision,
        "cudnn.fp32_precision": lambda: b.cudnn.fp32_precision,
        "cudnn.conv.fp32_precision": lambda: b.cudnn.conv.fp32_precision,
        "cudnn.rnn.fp32_precision": lambda: b.cudnn.rnn.fp32_precision,
        "mkldnn.fp32_precision": lambda: b.mkldnn.fp32_precision,
        "mkldnn.matmul.fp32_precision": lambda: b.mkldnn.matmul.fp32_precision,
        "mkldnn.conv.fp32_precision": lambda: b.mkldnn.conv.fp32_precision,
    }
    def snapshot():
        out = {}
        for name, get in GETTERS.items():
            try:
                out[name] = get()
            except (AttributeError, RuntimeError) as exc:
                out[name] = "error: " + type(exc).__name__
        return out
    report = []
    for setter in json.loads(sys.argv[1]):
        exec(setter)
        before = snapshot()
        with tf32_off("cuda"):
            inside = snapshot()
        report.append([setter, before, inside, snapshot()])
    print(json.dumps(report))
""")


def test_flags_restored_exactly_from_every_state(tmp_path):
    scenarios = _SCENARIOS + (_NEW_API_SCENARIOS if HAS_NEW_API else [])
    root = Path(dropflat.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(scenarios)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for setter, before, inside, after in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert after == before, f"after {setter!r}: {before} -> {after}"
        # Inside: TF32 off in both views, and no view unreadable that was readable before
        # (torch.compile reads the legacy flags; a disagreement raises there).
        assert inside["matmul.allow_tf32"] is False and inside["cudnn.allow_tf32"] is False, (setter, inside)
        if HAS_NEW_API:
            assert inside["cuda.matmul.fp32_precision"] == "ieee", (setter, inside)
            assert inside["cudnn.conv.fp32_precision"] in ("ieee", "none"), (setter, inside)
        readable = [k for k, v in before.items() if not str(v).startswith("error")]
        assert all(not str(inside[k]).startswith("error") for k in readable), (setter, before, inside)
