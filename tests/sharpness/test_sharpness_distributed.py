"""Sharpness chunks split over ranks (``shard=(rank, world_size)``) and ``sharpscope sharpness`` under torchrun.

The reference is always the single-process computation: each chunk's ascent (or noise draws) depends on that
chunk alone, so splitting the chunks over ranks and gathering them must give the same numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sharpness_cases import tiny_mlp
from torch import nn

from sharpscope import distributed
from sharpscope.errors import SharpscopeError
from sharpscope.sharpness import average_case_sharpness, m_sharpness, worst_case_sharpness


@pytest.mark.parametrize(("num_items", "world_size"), [(7, 2), (2, 3), (12, 4), (0, 2)])
def test_blocks_partition_the_items_in_rank_order(num_items, world_size):
    blocks = [distributed.block(num_items, (rank, world_size)) for rank in range(world_size)]
    assert [i for b in blocks for i in b] == list(range(num_items))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_a_single_rank_shard_equals_no_shard():
    # shard=(0, 1) runs the gather path with one block: bit-identical to the plain computation (float64)
    model, data = tiny_mlp(n=40)
    loss = nn.CrossEntropyLoss()
    plain = worst_case_sharpness(model, loss, data, rho=0.1, m=8, steps=3)
    sharded = worst_case_sharpness(model, loss, data, rho=0.1, m=8, steps=3, shard=(0, 1))
    np.testing.assert_array_equal(sharded.chunk_values, plain.chunk_values)
    plain = average_case_sharpness(model, loss, data, rho=0.1, m=8, num_draws=3)
    sharded = average_case_sharpness(model, loss, data, rho=0.1, m=8, num_draws=3, shard=(0, 1))
    np.testing.assert_array_equal(sharded.chunk_values, plain.chunk_values)


@pytest.mark.parametrize("shard", [(1, 2), (0, 0)])
def test_shard_must_match_the_process_group(shard):
    model, data = tiny_mlp(n=16)
    with pytest.raises(SharpscopeError, match="shard must be"):
        m_sharpness(model, nn.CrossEntropyLoss(), data, m_values=(4,), rho_values=(0.1,), steps=1, shard=shard)


def test_perturbations_are_not_gathered():
    model, data = tiny_mlp(n=16)
    with pytest.raises(SharpscopeError, match="return_perturbation=True cannot be combined with shard"):
        worst_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.1, m=4, steps=1, shard=(0, 1),
                             return_perturbation=True)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, sharpscope_process):
    sharpscope_process(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
                        "--out", tmp_path / "run"], tmp_path)
    # 7 chunks of 16 samples: blocks of 3 and 4 chunks, so the two ranks also run different group sizes
    options = [str(tmp_path / "run" / "final.pt"), "--measure", "worst,average", "--m", "16", "--rho", "0.05,0.1",
               "--average-rho", "0.05,0.1", "--steps", "3", "--num-draws", "3", "--max-chunks", "7", "--num-samples", "128", "--device", "cpu"]
    sharpscope_process(["sharpness", *options, "--out", tmp_path / "two"], tmp_path, ranks=2)
    sharpscope_process(["sharpness", *options, "--out", tmp_path / "one"], tmp_path)
    one = json.loads((tmp_path / "one" / "sharpness.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "sharpness.json").read_text())["rows"]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert (a["measure"], a["m"], a["rho"]) == (b["measure"], b["m"], b["rho"])
        # float32 forward passes, vmapped over groups of another size on each rank: equal to rounding
        assert b["value"] == pytest.approx(a["value"], rel=1e-6)
        assert b["stderr"] == pytest.approx(a["stderr"], rel=1e-5)
    # rank 0 alone wrote, and no rank left stray files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
