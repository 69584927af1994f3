"""splitserve kvtransfer."""
