"""An OpenAI-compatible HTTP server for long-video chat with MM-SP inference.

``python -m longvila_jax.serve --model DIR`` serves ``POST /v1/chat/completions`` (text,
images and videos as data URLs or paths under ``--media-root``; streamed or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` and a one-page UI at ``/``. The model runs
on one scheduler thread (``scheduler``) over ``infer.Generator``, the CLI's generator, so the
server answers exactly what ``python -m longvila_jax.infer`` answers for the same inputs and
seed. Modules: ``request`` (checking a body), ``media`` and ``decode_child`` (sandboxed
decoding), ``service`` (loading, prompts, limits), ``scheduler`` (queue and batches), ``text``
(stop strings), ``openai_format``, ``metrics``, ``errors``, ``limits``, ``app`` (routes).

Nothing is imported here: the decoder child runs as ``python -m longvila_jax.serve.decode_child``
and must start without jax.
"""
