"""Load-test and benchmark tools for fullpower (loopback only, bounded in count and time)."""
