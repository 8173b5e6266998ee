"""Bring-your-own-model cases: each module holds the few lines of factories (model, data, loss) that
``sharpscope train --model ... --dataset ... --loss ...`` and :func:`sharpscope.train.fit` take.

* :mod:`.language_model`: a small causal transformer on character tokens of a Python stdlib source file
  (``token ids + attention mask``, next-token cross-entropy as a :class:`~sharpscope.batches.BatchLoss`);
* :mod:`.regression`: an MLP with MSE on scikit-learn's bundled diabetes data;
* :mod:`.dict_input`: a model called as ``model(**inputs)`` (Hugging Face style) on scikit-learn's digits;
* :mod:`.hf_gpt2`: a Hugging Face ``transformers`` GPT-2 from a tiny config (random init, no download).

Nothing is downloaded. Run from the repository root (the current folder is importable for ``--model``).
"""
