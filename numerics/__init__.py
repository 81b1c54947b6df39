"""How a training step's arithmetic is done where plain PyTorch is not the fastest or the smallest:
FP8 matmuls (torchao), the LM head + cross-entropy in chunks, FlexAttention for packed documents,
8-bit AdamW on bf16 weights (torchao). Plain torch modules and functions; the model and the engine
in pretrain/ choose them from the config."""
