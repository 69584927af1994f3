"""splitserve placement."""
