"""`tokenpacker-eval`: answers the original's benchmark question files and scores the answers like its scripts."""
