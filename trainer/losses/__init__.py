"""Pure loss functions of the distillation trainer: DMD, GAN head, regression, temporal, preservation.

Tensors in, a scalar loss (or a gradient) out. Nothing here owns an optimizer, a model's
training state or random state it was not handed; nothing here imports :mod:`lpips` at import time.
"""
