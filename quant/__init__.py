"""Quantization: the export variants (`schemes`) and the ONNX weight transforms (`onnx_weights`)."""
