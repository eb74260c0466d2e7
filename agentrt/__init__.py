"""agentrt: an agent orchestration runtime around one in-process Nemotron-H engine.

Importing this package stays light: torch is imported only when an engine or
model is built (``agentrt.model``).
"""

__version__ = "0.1.0"
