"""``python -m longvila_jax.data.build_longvideo``: the long-video data engine's command line.

The engine itself is ``longvila_jax/longvideo/`` (it needs the backends, which sit above the data
layer); this package only holds the CLI, in ``__main__``, the application layer.
"""
