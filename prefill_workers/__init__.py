"""splitserve prefill_workers."""
