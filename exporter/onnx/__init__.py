"""The ONNX backend of `qwen-edge export`: trace, recurrent-op mapping, norm fusion, weights, file layout."""
