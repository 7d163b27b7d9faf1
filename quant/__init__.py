"""Quantization schemes and transforms (int8, block-wise int4, fp16): issue #3, not implemented yet."""
