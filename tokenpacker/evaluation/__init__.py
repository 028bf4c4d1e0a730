"""`tokenpacker-eval`: answers the original's benchmark question files (`generate`) and scores the answers like its
scripts (`score`).

Owns the evaluation command line; uses the model, processor and, for `--backend vllm`, `tokenpacker.serving`. Nothing
in configuration/, modeling/ or processing/ imports it, and it imports vLLM only when that backend is chosen.
"""
