"""Model building, kept apart from the serving face (`cluster/`): the built-in models
(built or converted on first use, cached, locked against concurrent builds), the tiny
HF-format models of `splitserve make-model`, their training, and the GGUF import."""
