"""Sweeps: every k of a range from one streaming pass, with the metrics to choose one."""
