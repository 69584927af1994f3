"""splitserve cluster: manifest, controller, router, OpenAI ingress, metrics, CLI.

Ray must see these before it is imported (DESIGN.md, CPU notes): without the first, this
Ray rewrites 127.0.0.1 to the machine's external address. Auth mode is set explicitly;
operators who want token auth set RAY_AUTH_MODE=token themselves.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
