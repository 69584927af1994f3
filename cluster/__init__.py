"""splitserve cluster: manifest, controller, router, OpenAI ingress, metrics, CLI.

Ray must see these before it is imported (DESIGN.md, CPU notes): without the first, this
Ray rewrites 127.0.0.1 to the machine's external address. Auth mode is set explicitly;
operators who want token auth set RAY_AUTH_MODE=token themselves.

Worker niceness: a raylet started from here (``splitserve serve`` without an address,
benchmarks, tests) runs its worker processes at niceness 0, not Ray's default 15 (meant
for pre-started idle workers). Our workers are the service: at 15 every niceness-0 process
(the ingress, Ray's own daemons, anything else on the machine) takes a core from a
worker's compute threads the moment it wakes, and with two OpenMP threads the other one
waits at the barrier meanwhile. vLLM's engine runs at 0. Measured in session 10
(benchmarks/results/2026-12-06-speed: colocated, 8 streams, two interleaved rounds,
92.3 / 95.9 tok/s at 0 against 87.5 / 95.0 at 15: a small gain, within the machine's
noise). A cluster started with ``ray start`` keeps what its operator set.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")
