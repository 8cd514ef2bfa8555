"""fullpower proxy: the OpenAI-compatible front end and the worker supervisor.

Importing this package stays light: no torch, no transformers (tests check it).
"""

__version__ = "0.1.0"
