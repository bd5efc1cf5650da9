"""Plots of models and sweeps, drawn on the server with matplotlib (Agg): PNG or SVG.

``render`` draws plain data (no database, no web framework); ``states`` holds the US states'
tile-grid layout; ``service`` loads what a plot shows (sampling large datasets); ``router`` is the
HTTP side (formats, caching). See docs/plots.md.
"""
