"""gpu-device-watcher: a live, validated map of NVIDIA device nodes for CRIU checkpoints.

This module stays import-light on purpose: the CRIU action script and the socket client
start through it and must not pay for asyncio, anyio or msgspec.
"""

__version__ = "0.1.0.dev0"
__all__ = ["__version__"]
