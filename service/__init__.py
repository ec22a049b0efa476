"""gRPC model server on onnxruntime: typed API and KServe V2 protocol over one model repository."""
