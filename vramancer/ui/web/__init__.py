"""The web dashboard: FastAPI app (app.py), uvicorn serving (server.py), vendored assets (static/)."""
