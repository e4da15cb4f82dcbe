"""The HTTP API (FastAPI): health, status, patients, studies, failures, webhooks, metrics. See ``app.create_app``."""
