"""Backends run a model. They are synchronous and know nothing of asyncio or the wire protocols."""
