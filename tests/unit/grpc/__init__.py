"""service.grpc: codecs, interceptor, status table, generated code (no server subprocess)."""
