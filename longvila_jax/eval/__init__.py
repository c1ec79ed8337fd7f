"""Evaluations: V-NIAH (``eval.vniah``, needles from ``eval.needles``) and the VideoMME-style
multiple-choice harness (``eval.videomme``, synthetic set ``eval.videomme_synthetic``), both on
the teacher-forced scoring forward of ``eval.forward`` (one device or MM-SP over a mesh).

Nothing is imported here so that ``python -m longvila_jax.eval.<module>`` runs each module once.
"""
