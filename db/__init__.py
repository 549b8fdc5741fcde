"""Persistence: SQLAlchemy models, schema versioning and the analysis job queue."""
