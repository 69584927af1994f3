"""splitserve engine."""
