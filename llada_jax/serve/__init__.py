"""The OpenAI-compatible HTTP adapter over `decode.engine` (`server`, Starlette; launch/serve.py).

The top layer: the core never imports it.
"""
