"""Transformer translation (a pydoc_data reversal task, WMT'14 en-de / en-fr)."""
