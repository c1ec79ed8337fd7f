"""Chat backends: the models the data engine and the caption benchmark ask for text.

``open_backend("local:DIR" | "openai:URL[#model]" | "oracle", role)`` (``backends.spec``) gives a
:class:`~longvila_jax.backends.base.ChatBackend`: our own checkpoint in this process
(``backends.local``), any OpenAI-compatible chat endpoint (``backends.openai_chat``), or the
synthetic corpus' oracles (``backends.oracle``, ``backends.oracle_judge``), which read the ground
truth and let tests check every stage exactly.
"""
