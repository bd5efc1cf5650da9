"""A small client of Centroid's HTTP API, for the ``centroid`` command's client subcommands.

It speaks HTTP only (httpx) and imports nothing of the server but :mod:`service.sample_data` (for
the workshop's CSV files): ``http`` (the typed client: base URL, API key, error bodies as
exceptions, Server-Sent Events), ``workshop`` (Lab 3 as one function, and a throwaway server to
run it on), ``output`` (rich tables for people, JSON for scripts).
"""
