"""m-sharpness on an attention model runs vectorised (vmap over chunks, the fused attention kernels switched off),
never the per-chunk fallback, and equals the serial loop (float64: 1e-9 relative, the same arithmetic batched)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from sharpscope.sharpness import average_case_sharpness, worst_case_sharpness


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        e = self.embed(tokens)
        a, _ = self.attention(e, e, e, need_weights=False)
        return self.head(self.norm(e + a).mean(1))


def test_attention_model_is_vectorised_and_matches_the_loop():
    model = TokenModel().double().eval()
    g = torch.Generator().manual_seed(0)
    data = [({"tokens": torch.randint(0, 7, (12, 5), generator=g)}, torch.randint(0, 3, (12,), generator=g))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-chunk fallback warns: it must not happen
        fast = worst_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.1, m=3, steps=3)
        fast_avg = average_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.1, m=3, num_draws=2)
    slow = worst_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.1, m=3, steps=3, vectorize=False)
    slow_avg = average_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.1, m=3, num_draws=2,
                                      vectorize=False)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(fast_avg.chunk_values, slow_avg.chunk_values, rtol=1e-9, atol=1e-13)
    assert fast.value > 0
