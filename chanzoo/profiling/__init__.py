"""The profiler's library side: ``measure`` (parameters, FLOPs, timing, memory) and ``report`` (tables, files).

The command line is ``python -m chanzoo.profile`` (``chanzoo.profile``).
"""
