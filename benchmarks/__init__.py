"""splitserve benchmarks."""
