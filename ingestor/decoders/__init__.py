"""Decoders: one module per device format, each turning one message into readings.

A decoder only extracts (metric, value, time, unit); ``payload.finish`` then applies the native
format's checks, and resolution, type checks, batching, rules and acknowledgement stay in
``ingestor.batch`` and after it. ``ingestor.sources`` picks the decoder by the source's name.
"""
