"""Data parallel over torch.distributed: results of 2 gloo ranks equal a single-process run, on every rank.

The workers are spawned processes; each saves its results and the parent
compares them with the same computations done here without a process group.
Sharding only reorders a float64 sum of 5 batch terms (two partial sums, then
one all-reduce), so products differ by a few ulps (~1e-16 relative); Lanczos,
Hutch++ and the Gram eigenvalues are well conditioned on these small operators,
so 1e-10 relative is ample headroom yet far below any wrong weighting, missed
batch or shifted mask (those change results at the 1e-2 level).
"""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dropflat
from dropflat.data import iterate_batches
from dropflat.distributed import owns, resolve_distributed
from dropflat.model_loss import ModelLoss

from families import assert_untouched, mlp, snapshot

SIZES = [7, 3, 5, 1, 4]  # uneven: rank 0 of 2 gets 16 samples in 3 batches, rank 1 gets 4 in 2
RTOL = 1e-10


def make_case(seed):
    torch.manual_seed(seed)
    model = mlp("relu").double()
    model.train()  # dropflat must evaluate with its own modes and leave this flag alone
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(sum(SIZES), 5, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    bounds = torch.tensor([0] + SIZES).cumsum(0).tolist()
    loader = [(X[a:b], Y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=torch.float64)
    return model, loader, V


def compute(seed):
    """Everything compared across ranks; run with or without a process group."""
    model, loader, V = make_case(seed)
    before = snapshot(model)
    out = {}
    for mode in ("off", "fixed", "mean"):
        H = dropflat.HessianOperator(model, loader, dropout=mode, num_masks=2, mask_index=3)
        out[f"HV_{mode}"] = H @ V
        loss, grad = H.loss_and_gradient()
        out[f"loss_{mode}"], out[f"grad_{mode}"] = torch.tensor(loss, dtype=torch.float64), grad
    H = dropflat.HessianOperator(model, loader, dropout="fixed")
    with H.retained():  # first product fills the cache, the second runs on this rank's graphs only
        out["HV_retained_1"], out["HV_retained_2"] = H @ V, H @ V
    out["lanczos"] = dropflat.lanczos(model, loader, k=3).eigenvalues
    out["trace"] = torch.tensor(float(dropflat.hessian_trace(model, loader, num_matvecs=12)), dtype=torch.float64)
    out["noise"] = dropflat.dropout_noise(model, loader, num_masks=8).eigenvalues
    out["noise_shared"] = dropflat.dropout_noise(model, loader, num_masks=8, masks="shared").eigenvalues
    assert_untouched(model, before)
    return out, model, loader, V


def _worker(rank, world, init_file, out_dir, seed):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out, model, loader, V = compute(seed)
        # distributed=False ignores the group: every rank computes the whole sum by itself.
        out["HV_local"] = dropflat.HessianOperator(model, loader, distributed=False) @ V
        # A NaN in batch 1 (rank 1's): rank 1 reports it, rank 0 must raise too instead of hanging.
        bad = [(x.clone(), y) for x, y in loader]
        bad[1][0][0, 0] = float("nan")
        before = snapshot(model)
        try:
            ModelLoss(model, bad).loss_and_gradient()
            out["error"] = "no error"
        except Exception as e:  # noqa: BLE001 - the type and message are what is checked
            out["error"] = f"{type(e).__name__}: {e}"
        assert_untouched(model, before)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path, seed, timeout=90):
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), seed), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {timeout} s (a collective hangs?)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _close(a, b):
    return torch.allclose(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


def test_two_ranks_equal_single_process(tmp_path, fresh_seed):
    ranks = _spawn(2, tmp_path, fresh_seed)
    ref, model, loader, V = compute(fresh_seed)
    for r, got in enumerate(ranks):
        for key, want in ref.items():
            assert _close(got[key], want), f"rank {r}: {key} differs from the single-process run"
        assert _close(got["HV_local"], ref["HV_off"])
    for key in ref:  # replicated, bit for bit: every rank holds the same all-reduced sums
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[1]["error"].startswith("FloatingPointError") and "batch 1" in ranks[1]["error"]
    assert ranks[0]["error"].startswith("RuntimeError") and "other rank" in ranks[0]["error"]
    # An independent reference for the loss: the explicit per-sample mean with dropout off.
    X = torch.cat([x for x, _ in loader])
    Y = torch.cat([y for _, y in loader])
    assert float(ranks[0]["loss_off"]) == pytest.approx(F.cross_entropy(model.eval()(X), Y).item(), rel=1e-12)
    # Dropout really acts, so the "fixed"/"mean" comparisons above test the masks (global sample index).
    assert not _close(ref["grad_fixed"], ref["grad_off"])


def test_world_size_one_is_the_single_process_path(tmp_path, fresh_seed):
    model, loader, V = make_case(fresh_seed)
    plain = dropflat.HessianOperator(model, loader, dropout="fixed")
    HV, (loss, grad) = plain @ V, plain.loss_and_gradient()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        assert resolve_distributed(None) is None  # a group of one: no sharding, no collectives
        H = dropflat.HessianOperator(model, loader, dropout="fixed", distributed=True)
        assert torch.equal(H @ V, HV)
        loss1, grad1 = H.loss_and_gradient()
        assert loss1 == loss and torch.equal(grad1, grad)
    finally:
        dist.destroy_process_group()


def test_shard_rule_keeps_global_offsets():
    loader = [(torch.zeros(n, 1), torch.zeros(n)) for n in SIZES]
    full = [(b.index, b.offset, b.size) for b in iterate_batches(loader)]
    parts = [[(b.index, b.offset, b.size) for b in iterate_batches(loader, shard=(r, 2))] for r in range(2)]
    assert parts[0] == [full[0], full[2], full[4]] and parts[1] == [full[1], full[3]]
    assert [owns(b, 1, 3) for b in range(5)] == [False, True, False, False, True]
    one = [(torch.zeros(2, 1), torch.zeros(2))]
    assert list(iterate_batches(one, shard=(1, 2))) == []  # a rank may own nothing: not an empty loader
    with pytest.raises(ValueError, match="rank < world_size"):
        list(iterate_batches(one, shard=(2, 2)))


def test_bad_distributed_argument():
    model, loader, _ = make_case(0)
    with pytest.raises(TypeError, match="distributed must be None"):
        ModelLoss(model, loader, distributed="yes")
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        dropflat.HessianOperator(model, loader, distributed=True)


TORCHRUN_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_distributed import compute
torch.set_num_threads(1)
dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT
try:
    out, *_ = compute({seed})
    torch.save(out, os.path.join({out!r}, f"rank{{dist.get_rank()}}.pt"))
finally:
    dist.destroy_process_group()
"""


def test_torchrun_two_ranks_equal_single_process(tmp_path, fresh_seed):
    """The way users launch it: ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU)."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), seed=fresh_seed, out=str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref, *_ = compute(fresh_seed)
    for key in ("HV_off", "HV_fixed", "lanczos", "trace", "noise", "noise_shared"):
        for r, got in enumerate(ranks):
            assert _close(got[key], ref[key]), f"rank {r}: {key} differs from the single-process run"
