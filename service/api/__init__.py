"""Protocol adapters: thin decode → core → encode layers over the model repository."""
