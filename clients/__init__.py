"""Clients of a streamgen server: ``stream`` (CLI + library over gRPC); ``webrtc`` (browser/OBS gateway).

Clients speak only the public API (``streamgen.api.v1`` stubs); they never import the engine,
the model or torch.
"""
