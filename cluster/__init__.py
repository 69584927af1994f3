"""splitserve cluster: manifest, controller, router, OpenAI ingress, metrics, CLI.

Ray must see these before it is imported (DESIGN.md, CPU notes): without the first, this
Ray rewrites 127.0.0.1 to the machine's external address. Auth mode is set explicitly;
operators who want token auth set RAY_AUTH_MODE=token themselves.

Worker niceness stays Ray's (15 for worker processes): session 10 measured niceness 0 at
+1-5 % tokens/s at 8 streams (within the machine's noise), and at 15 the ingress, which
shares these 2 cores, keeps priority over the workers' compute: the burst benchmark's
admitted TTFT was measured so. Set RAY_worker_niceness=0 to run workers as vLLM runs its
engine.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
