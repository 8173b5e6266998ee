"""Sharded trace / density (``shard=(rank, world_size)``) and ``hessian-spectrum`` under a 2-rank torchrun job.

The reference is always the single-process computation with the same seeds: sharding only splits which rank
multiplies which probe / runs which Lanczos start vector, so the results must agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.hessian.density import spectral_density
from sharpscope.hessian.trace import hutchinson_trace, hutchpp_trace


def _spd(n: int = 30) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    B = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return B @ B.T / n


def test_single_rank_shard_matches_unsharded():
    # shard=(0, 1) goes through the gather-and-reorder code path; same float64 products in another batching, so
    # agreement is to rounding (1e-12 relative)
    A = _spd()
    for estimator in (hutchinson_trace, hutchpp_trace):
        plain = estimator(A, num_matvecs=12, seed=3, block_size=5)
        sharded = estimator(A, num_matvecs=12, seed=3, block_size=5, shard=(0, 1))
        assert sharded.value == pytest.approx(plain.value, rel=1e-12)
        assert sharded.stderr == pytest.approx(plain.stderr, rel=1e-10)
        assert sharded.num_matvecs == plain.num_matvecs
    plain = spectral_density(A, num_iters=8, num_runs=3, num_points=200, seed=1)
    sharded = spectral_density(A, num_iters=8, num_runs=3, num_points=200, seed=1, shard=(0, 1))
    torch.testing.assert_close(sharded.nodes, plain.nodes, rtol=1e-12, atol=0)
    torch.testing.assert_close(sharded.density, plain.density, rtol=1e-10, atol=1e-12)
    assert sharded.num_matvecs == plain.num_matvecs


@pytest.mark.parametrize("shard", [(1, 2), (2, 2), (0, 0)])
def test_shard_must_match_the_process_group(shard):
    # not launched by torchrun: only (0, 1) (or None) describes this process
    A = _spd(6)
    with pytest.raises(SharpscopeError, match="shard must be"):
        hutchpp_trace(A, num_matvecs=6, shard=shard)
    with pytest.raises(SharpscopeError, match="shard must be"):
        spectral_density(A, num_iters=3, num_runs=2, shard=shard)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sharpscope_process):
    folder = tmp_path_factory.mktemp("hessian-dist")
    sharpscope_process(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
                        "--out", folder / "run"], folder)
    return folder / "run" / "final.pt"


@pytest.mark.slow
def test_two_ranks_equal_one_process(checkpoint, tmp_path, sharpscope_process):
    options = [str(checkpoint), "--trace", "--density", "--density-runs", "4", "--density-iters", "10", "--top-k",
               "1", "--num-samples", "128", "--device", "cpu"]
    sharpscope_process(["hessian-spectrum", *options, "--out", tmp_path / "two"], tmp_path, ranks=2)
    sharpscope_process(["hessian-spectrum", *options, "--out", tmp_path / "one"], tmp_path)
    one = json.loads((tmp_path / "one" / "spectrum.json").read_text())["checkpoints"]
    two = json.loads((tmp_path / "two" / "spectrum.json").read_text())["checkpoints"]
    assert len(one) == len(two) == 1
    # the Hessian-vector products are float32; Hutch++'s sketch H S is multiplied in other column blocks on two
    # ranks, which changes its rounding (~1e-9 relative seen), hence rtol 1e-6. Density runs are whole Lanczos runs
    # on one rank each with the same start vectors, hence equal to rounding as well.
    assert two[0]["trace"]["value"] == pytest.approx(one[0]["trace"]["value"], rel=1e-6)
    assert two[0]["trace"]["stderr"] == pytest.approx(one[0]["trace"]["stderr"], rel=1e-6)
    assert two[0]["trace"]["num_matvecs"] == one[0]["trace"]["num_matvecs"]
    assert two[0]["num_matvecs"] == one[0]["num_matvecs"]
    assert two[0]["top_eigenvalues"] == pytest.approx(one[0]["top_eigenvalues"], rel=1e-6)
    with np.load(tmp_path / "one" / "spectrum.npz") as a, np.load(tmp_path / "two" / "spectrum.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            if "density" in name:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-9 * np.abs(a[name]).max())
    # rank 0 alone wrote, and no rank left stray files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
