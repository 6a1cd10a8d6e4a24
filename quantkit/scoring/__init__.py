"""Scoring every variant against the original: the evaluation windows and their statistics
(``windows``), GGUFs through llama.cpp's llama-perplexity and llama-bench (``llamacpp``), HF/GPTQ/AWQ
checkpoints in torch (``hf``), and lm-eval multiple-choice tasks on both (``tasks``, ``tasks_llamacpp``)."""
