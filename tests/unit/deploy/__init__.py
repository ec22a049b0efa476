"""deploy/, Dockerfile, docker-compose.yml: static checks (no server runs)."""
