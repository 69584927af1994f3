"""splitserve cluster."""
