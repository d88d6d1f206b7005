"""Export to ONNX and run it with ONNX Runtime."""
