"""service.observability: the metrics exporter and the request log."""
