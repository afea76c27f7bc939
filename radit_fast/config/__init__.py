"""Every option of every stage, declared once (a dataclass field with its help, type, range and choices).

* :mod:`~radit_fast.config.fields`: :func:`option`, the one loader/coercion, the checks and the argparse flags
  derived from the fields;
* :mod:`~radit_fast.config.stages`: ``radit train-lm`` / ``train-retriever`` (``RaItConfig``,
  ``RetrieverConfig``);
* :mod:`~radit_fast.config.evaluation`: ``radit eval`` (``EvalSettings``, ``LMEvalSettings``);
* :mod:`~radit_fast.config.run`: ``radit run`` (``RunOptions``, ``RunConfig``, run files and presets;
  presets.yaml holds the preset data).
"""
