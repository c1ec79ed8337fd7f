"""Input pipeline: manifests, PyAV/Pillow decoding, chat templates, packing, resumable iterators.

Modules (imported explicitly; this package imports nothing so that the decode sandbox child
process starts fast):

- ``pipeline``: ``DataIterator`` / ``build_dataset`` and the documented batch layout.
- ``sources``: manifest sources and safe media paths; ``samples``: per-sample transform.
- ``video`` / ``sandbox``: PyAV sampling and decoding, killable decode process with a timeout.
- ``image``: Pillow loading and SigLIP normalisation; ``text``: tokenizer, templates, labels.
- ``packing``: static-shape rows with segment ids, positions and shifted labels.
- ``skips``: skip reasons, counters and the skip-rate guard.
- ``synthetic`` / ``check``: the synthetic corpus and the manifest-check CLIs.
"""
