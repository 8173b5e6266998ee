"""A small causal transformer language model on real text that ships with Python (no download).

The text is the source of the standard library's :mod:`textwrap` module (``inspect.getsource``), lower-cased,
as character tokens: the letters, space, newline and ``.,:()_='"#`` each get an id, every other character one
shared id. Samples are windows of ``length`` tokens; some are cut short and padded (``attention_mask`` 0), so the
mask matters. The loss is next-token cross-entropy over the real (unpadded) positions, a
:class:`~sharpscope.batches.BatchLoss` because the batch is a Hugging-Face-style dict without a targets half.

    sharpscope train --model examples.byom.language_model:make_model \\
        --dataset examples.byom.language_model:textwrap_chars --loss examples.byom.language_model:next_token_loss \\
        --optimizer sam --rho 0.05 --lr 0.5 --epochs 5 --out runs/lm
"""

from __future__ import annotations

import inspect
import math
import string
import textwrap

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpscope.batches import BatchLoss
from sharpscope.train import BatchData

ALPHABET = string.ascii_lowercase + " \n.,:()_='\"#"
VOCAB_SIZE = len(ALPHABET) + 2  # + "other" + padding
OTHER, PAD = len(ALPHABET), len(ALPHABET) + 1


def encode(text: str) -> Tensor:
    """Character ids (int64) of ``text`` lower-cased; characters outside :data:`ALPHABET` share id ``OTHER``."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index.get(c, OTHER) for c in text.lower()], dtype=torch.int64)


def textwrap_tokens() -> Tensor:
    """The whole token stream of textwrap.py's source."""
    return encode(inspect.getsource(textwrap))


def windows(tokens: Tensor, *, count: int, length: int, seed: int) -> dict[str, Tensor]:
    """``count`` windows of ``length`` tokens at seeded random offsets; every third one cut to a seeded shorter
    length and padded: ``{"input_ids": (count, length), "attention_mask": (count, length)}``."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length, (count,), generator=generator)
    ids = torch.stack([tokens[s:s + length] for s in starts.tolist()])
    keep = torch.full((count,), length)
    keep[::3] = torch.randint(length // 2, length, (len(keep[::3]),), generator=generator)
    mask = (torch.arange(length) < keep[:, None]).to(torch.int64)
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


def textwrap_chars(train_samples: int = 64, test_samples: int = 32, length: int = 16,
                   batch_size: int = 16) -> BatchData:
    """The dataset factory: train windows from the first 80% of the text, test windows from the rest."""
    tokens = textwrap_tokens()
    cut = int(0.8 * len(tokens))
    train = windows(tokens[:cut], count=train_samples, length=length, seed=0)
    test = windows(tokens[cut:], count=test_samples, length=length, seed=1)

    def batches(data: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        n = len(data["input_ids"])
        return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]

    return BatchData(train=batches(train), test=batches(test))


class Block(nn.Module):
    """Pre-norm transformer block with hand-written causal attention (plain matmuls and a softmax: twice
    differentiable and vmap-able, unlike the fused attention kernels)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        n, t, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)  # (n, heads, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = causal & attention_mask[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, -1e9)  # finite: a fully padded row stays finite (then ignored)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, width)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(nn.Module):
    """``forward(input_ids, attention_mask) -> logits (n, t, vocab)``: embeddings, ``layers`` blocks, a head."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, width: int = 8, heads: int = 2, layers: int = 1,
                 max_length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(0.02 * torch.randn(max_length, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.head(self.norm(x))


def make_model(width: int = 8, heads: int = 2, layers: int = 1, max_length: int = 16) -> TinyCausalLM:
    """The model factory (1,424 parameters by default: small enough for the dense Hessian)."""
    return TinyCausalLM(width=width, heads=heads, layers=layers, max_length=max_length)


def masked_next_token_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of predicting token ``t + 1`` from tokens ``<= t`` over positions where both are real."""
    logits = model(**batch)[:, :-1]
    targets = batch["input_ids"][:, 1:]
    real = batch["attention_mask"][:, 1:].to(logits.dtype)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (per_token * real.reshape(-1)).sum() / real.sum()


def next_token_loss() -> BatchLoss:
    """The loss factory for ``--loss``."""
    return BatchLoss(masked_next_token_loss)
