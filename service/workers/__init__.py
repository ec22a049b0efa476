"""Worker processes: ``--workers N`` runs N whole servers on one gRPC (and HTTP) port under one
supervisor (``SO_REUSEPORT``: the kernel spreads connections over them). ``supervisor.py`` holds
the ports, starts and restarts the workers, fans model control out and serves one metrics page;
``worker.py`` is a worker's side of it; ``control.py`` the channel between them; ``merge.py``
adds the workers' metrics up; ``ports.py`` the port checks. See docs/serving.md#worker-processes.
"""
