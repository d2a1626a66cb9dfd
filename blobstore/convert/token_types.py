"""Token types of a GGUF vocabulary (tokenizer.ggml.token_type): sentencepiece's piece types,
whose numbers llama.cpp kept for every vocabulary kind."""

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
