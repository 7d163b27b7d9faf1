"""The Core ML backend of `qwen-edge export`, and checking Core ML packages without Core ML."""
