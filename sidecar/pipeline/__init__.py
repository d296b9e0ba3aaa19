"""The request path: one module a stage (admit, hold, forward, outcome, settle, respond), each taking
plain values and returning one, and the handler that walks them (handler.py)."""
