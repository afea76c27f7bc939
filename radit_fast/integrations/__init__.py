"""Drop-in integrations of radit-fast's fused ops with the training libraries people already use.

Submodules are imported on demand (each pulls in a heavy third-party package):

* ``radit_fast.integrations.transformers``: :func:`~radit_fast.integrations.transformers.patch` a Hugging Face
  causal LM (or :func:`~radit_fast.integrations.transformers.apply_radit_kernels` to a model class) so its
  ``labels`` loss runs through the fused LM-head op without materialising logits; works under ``Trainer``,
  TRL's ``SFTTrainer``, peft, packed batches and ``torch.compile``.
* ``radit_fast.integrations.sentence_transformers``: ``LSRLoss``, the stage-2 (R-IT) objective as a loss for
  ``SentenceTransformerTrainer``, through the same op as ``radit train-retriever``.
"""
