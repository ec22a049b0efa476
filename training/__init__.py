"""Training package: fits the bundled models with torch and exports them to ONNX."""
