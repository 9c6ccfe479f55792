"""Evaluation: decode a held-out split and score it (`heldout`), benchmark files in their public
formats with resumable scored runs (`benchmarks`), the Multi-Block Editing study's variants and
their mean ± std over seeds (`mbe_study`), and the plots (`plots`). REFERENCE §5 (modes) and §7
(published numbers).

May import `decode`, `rewards`, `train` (checkpoints, metrics), `model`, `data`, `parallel`;
RL uses it for its held-out points, so it never imports `rl`.
"""
