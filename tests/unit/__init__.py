"""In-process unit tests, one folder per package of service/ (and training/, deploy/)."""
