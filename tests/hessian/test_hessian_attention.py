"""Token models (Embedding -> nn.MultiheadAttention -> LayerNorm -> head) through the Hessian operator.

With ``need_weights=False`` attention runs torch's fused scaled-dot-product kernel, which has no double backward
on torch 2.13 (HVPs raised); the operator builds its gradient graphs with the math backend
(sharpscope.batches.unfused_attention). Reference: the dense Hessian by column-wise double backward of the same
model with ``need_weights=True`` (the explicit softmax(QK^T)V route, no fused kernel), in float64; 1e-10 relative,
both being double backward of the same function in a different op order.
"""

from __future__ import annotations

import torch
from torch import nn

from sharpscope.hessian import HessianOperator, lanczos_eigs


class TokenModel(nn.Module):
    def __init__(self, need_weights: bool, vocab: int = 7, dim: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.need_weights = need_weights
        self.embed = nn.Embedding(vocab, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens, padding=None):
        e = self.embed(tokens)
        a, _ = self.attention(e, e, e, need_weights=self.need_weights, key_padding_mask=padding)
        return self.head(self.norm(e + a).mean(1))


def _batches():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (10, 5), generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    return [((tokens[:4],), labels[:4]), ({"tokens": tokens[4:]}, labels[4:])]


def _dense(model, batches):
    params = list(model.parameters())
    loss = sum(nn.functional.cross_entropy(model(*x) if isinstance(x, tuple) else model(**x), y) * len(y) / 10
               for x, y in batches)
    flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    return torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
                        for i in range(flat.numel())], dim=1)


def test_fused_attention_model_hvp_matches_the_dense_hessian():
    fused = TokenModel(need_weights=False).double().eval()
    explicit = TokenModel(need_weights=True).double().eval()
    batches = _batches()
    dense = _dense(explicit, batches)
    H = HessianOperator(fused, nn.CrossEntropyLoss(), batches)
    V = torch.randn(H.num_params, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    product = H @ V
    expected = dense @ V
    assert torch.allclose(product, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max())), \
        float((product - expected).abs().max())
    top = lanczos_eigs(H, 1, tol=1e-10)
    assert abs(float(top.eigenvalues[0]) - float(torch.linalg.eigvalsh(dense)[-1])) <= 1e-9 * float(dense.abs().max())
    assert torch.backends.mha.get_fastpath_enabled()  # the setting is restored
