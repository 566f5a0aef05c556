"""Compression with real integers: quantised weights stored and multiplied as integers."""
