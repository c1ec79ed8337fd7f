"""Evaluations: V-NIAH (``eval.vniah``: haystack in ``eval.haystack``, needles from
``eval.needles``), the VideoMME-style multiple-choice harness (``eval.videomme``: annotations in
``eval.videomme_annotations``, synthetic set ``eval.videomme_synthetic``) and the held-out
accuracy (``eval.heldout``), all on the teacher-forced scorer of ``infer.scoring`` (one device or
MM-SP over a mesh) and the prompts of ``infer.prompts``. ``eval.cli`` holds what the command
lines share; each ``main`` lives in its own module.

Nothing is imported here so that ``python -m longvila_jax.eval.<module>`` runs each module once.
"""
