"""Evaluation suite: exact measurements on rendered product videos and the videos a model generates.

Modules: ``segment`` (object/background split of frames with no ground truth), ``oracle``
(colour drift, over-exposure, motion/freeze, subject drift, background stability),
``classifier`` (attribute classifier: model, preprocessing, loading; ``python -m
trainer.eval.classifier --train``), ``classifier_train`` (its training loop), ``frechet``
(Frechet distance on classifier features), ``suite`` (all metrics on one clip and on a set,
per window over time), ``inputs`` (videos + prompts from disk, rendered reference clips,
optional generation) and ``report`` (Markdown, JSON and PNG drift curves). The front door is
``python -m trainer.evaluate``. Nothing is imported here, so ``import trainer.eval`` is free.
"""
