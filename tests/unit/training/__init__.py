"""training: data, regression, export, the bundled model files."""
