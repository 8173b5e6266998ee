"""A Hugging Face ``transformers`` GPT-2 built from a tiny config (random init, nothing downloaded), trained on
the character tokens of :mod:`examples.byom.language_model`. Needs ``pip install "sharpscope[hf]"``.

The batch is what a Hugging Face data collator gives, ``{"input_ids", "attention_mask", "labels"}`` (``labels``
-100 at padding), and the loss is the model's own (``model(**batch).loss``), as in HF's ``Trainer``.

    sharpscope train --model examples.byom.hf_gpt2:make_model --dataset examples.byom.hf_gpt2:textwrap_chars \\
        --loss examples.byom.hf_gpt2:model_loss --optimizer sam --lr 0.5 --epochs 5 --out runs/gpt2
"""

from __future__ import annotations

from torch import Tensor, nn

from examples.byom import language_model
from sharpscope.batches import BatchLoss
from sharpscope.train import BatchData


def make_model(width: int = 8, heads: int = 2, layers: int = 1, max_length: int = 16) -> nn.Module:
    """``GPT2LMHeadModel`` from a tiny ``GPT2Config``: eager attention (the fused SDPA kernel has no double
    backward on CPU, which Hessian-vector products need), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=language_model.VOCAB_SIZE, n_positions=max_length, n_embd=width,
                        n_layer=layers, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="eager", bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def textwrap_chars(train_samples: int = 64, test_samples: int = 32, length: int = 16,
                   batch_size: int = 16) -> BatchData:
    """The language model's windows with ``labels`` added: the input ids, -100 where padded."""
    data = language_model.textwrap_chars(train_samples, test_samples, length, batch_size)

    def with_labels(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}

    return BatchData(train=[with_labels(b) for b in data.train], test=[with_labels(b) for b in data.test])


def _hf_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).loss


def model_loss() -> BatchLoss:
    """The loss factory for ``--loss``: the model's own next-token loss."""
    return BatchLoss(_hf_loss)
