"""Procedural product-video data with exact ground truth, rendered on the fly for training.

Modules, in dependency order: ``attributes`` (vocabulary, :class:`ClipSpec`, sampling, the
held-out split), ``scene`` (per-clip parameters and per-frame pose), ``backgrounds``,
``surface`` and ``shapes`` (geometry), ``renderer`` (``render_clip`` and ground truth),
``captions``, ``dataset`` (torch datasets) and ``preview`` (``python -m trainer.data.preview``).
Nothing is imported here, so ``import trainer.data`` stays free of numpy and torch.
"""
