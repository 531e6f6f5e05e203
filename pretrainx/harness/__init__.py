"""Downstream evaluation: per-token scoring of token sequences (`scoring`), lm-evaluation-harness's
LM API on a pretrainx model (`lm`), and running harness tasks standalone or in the training loop
(`runner`), and long-context retrieval grids built from a run's validation text (`long_context`).
lm-eval is imported only by `lm` and `runner`."""
