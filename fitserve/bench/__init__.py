"""`fitserve bench`: load generation, metric math, hardware counters and the roofline.

metrics.py holds the formulas of BENCHMARKING.md once; the server's /metrics reuses them.
Everything here talks to servers over HTTP only, so any OpenAI-compatible server can be measured.
"""
