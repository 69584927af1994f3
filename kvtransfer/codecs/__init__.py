"""Codec implementations behind ``kvtransfer.codec.get_codec``; one codec per module."""
