"""Email newsletter and urgent-alert service for a human-rights news portal."""

__version__ = "0.1.0"
