"""``dropflat.heap``: freed CPU memory is reused inside the context and handed back after it.

Each check runs in a fresh interpreter: glibc's thresholds are process state,
and this test process has already run other tests' passes.
"""
import json
import subprocess
import sys

import pytest

from dropflat.heap import _LIBC

pytestmark = pytest.mark.skipif(_LIBC is None, reason="glibc only (Linux)")

PROBE = r"""
import gc, json, resource, torch
from dropflat.heap import HeapLease, cpu_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

def churn(n=12, mib=64):  # what a pass does: allocate activation-sized blocks, write them, free them
    before = faults()
    for _ in range(n):
        torch.empty(mib << 18, dtype=torch.float32).fill_(1.0)
    return faults() - before

outside = churn()
with cpu_heap():
    with cpu_heap():  # nested: only the outermost acts
        inside = churn()
    held = rss_mib()
    x = sum(torch.ones(1 << 20) for _ in range(3))
trimmed = rss_mib()
lease = HeapLease()  # what a CPU operator holds between its products
leased = churn()
lease_held = rss_mib()
del lease
gc.collect()
print(json.dumps({"outside": outside, "inside": inside, "held": held, "trimmed": trimmed, "x": float(x[0]),
                  "leased": leased, "lease_held": lease_held, "lease_trimmed": rss_mib()}))
"""


def _probe(env_extra=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_inside_and_returned_after():
    r = _probe()
    pages = (64 << 20) // 4096  # one 64 MiB block, in 4 KiB pages
    # Outside, glibc maps every 64 MiB block afresh: each of the 12 faults all its pages in.
    assert r["outside"] >= 10 * pages, r
    # Inside, the first block is faulted in once and then reused (allow two blocks' worth of slack).
    assert r["inside"] <= 2 * pages, r
    # On leaving, the kept memory goes back to the kernel (malloc_trim).
    assert r["held"] - r["trimmed"] >= 48, r
    assert r["x"] == 3.0
    # A lease acts the same from its creation until it is collected.
    assert r["leased"] <= 2 * pages and r["lease_held"] - r["lease_trimmed"] >= 48, r


def test_switched_off_by_the_environment():
    r = _probe({"DROPFLAT_HEAP": "0"})
    pages = (64 << 20) // 4096
    assert r["inside"] >= 10 * pages, r  # the context did nothing
