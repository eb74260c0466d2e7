"""The NemotronH engine: network, checkpoints, tokenizer and chat formats."""
