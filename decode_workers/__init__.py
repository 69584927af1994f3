"""splitserve decode_workers."""
