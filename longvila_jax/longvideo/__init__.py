"""The long-video data engine behind ``python -m longvila_jax.data.build_longvideo``: long videos
are probed and cut into clips, a captioner describes every clip, a writer LLM turns the ordered
clip captions into a summary and question-answer pairs, and the checked result is a VILA-format
manifest that stage 5 trains on. Every stage is resumable (``longvideo.store``)."""
