"""Networks, each built by name from its parameter group."""
