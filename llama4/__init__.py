"""herd's model core: Llama 4 config, checkpoints, tokenizer and the layer stack.

The layer stack is written once against the MoEBackend seam (llama4.moe): it never
knows whether the routed experts run in this process or on remote expert workers.
"""
