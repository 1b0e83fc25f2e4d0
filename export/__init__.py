"""Checkpoint -> ONNX (fp32, fp16) -> verified -> TensorRT engine, each step small and checked."""
