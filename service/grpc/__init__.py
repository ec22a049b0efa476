"""The gRPC front end: the typed API (``serving.v1``) and the KServe V2 protocol, one server."""
