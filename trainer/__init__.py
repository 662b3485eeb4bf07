"""streamgen trainer: procedural data, teacher, Self-Forcing distillation and evaluation.

The trainer imports :mod:`streamgen`; :mod:`streamgen` never imports the trainer.
"""
