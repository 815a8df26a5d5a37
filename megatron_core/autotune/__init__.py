"""Automatic parallel-layout tuning: memory model, cost model, search and the command line."""
