"""The explorer: a local web page (and its JSON API) to look inside a trained model.

``cnn serve MODEL`` runs it; :func:`create_app` builds the ASGI app for a loaded model. Needs
the optional extra ``serve`` (``pip install 'classic-cnn[serve]'``).
"""

from __future__ import annotations

from .app import MAX_UPLOAD_BYTES, create_app, serve

__all__ = ["MAX_UPLOAD_BYTES", "create_app", "serve"]
