"""zimage-server: serve the Z-Image text-to-image models over the OpenAI Images API."""

__version__ = "0.1.0"
