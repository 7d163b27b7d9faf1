"""`qwen-edge verify`: parity of an export against the PyTorch reference, and quality of its variants."""
