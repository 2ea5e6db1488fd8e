"""Benchmarks: how close the library and the service run to the device's limit, and against the paper's loop.

``python -m bench`` measures, in one run on one device: the limit L (the base classifier's raw
noise + forward + argmax throughput at its best batch size), the library's CERTIFY throughput,
the service's throughput under K concurrent certify clients, predict latency under load, a
mixed load against the paper's one-request-at-a-time loop, cache-hit latency and the service's
memory. Every headline figure is a ratio of two numbers measured within the same run.
"""
