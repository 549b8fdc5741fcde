"""The operator's web console: pages for the admin, JSON health endpoints and Prometheus metrics for machines."""
