"""Running the node: health and status (health), the HTTP endpoint (http) that serves them
with the Prometheus metrics (prometheus), structured logging (logs) and archive retention."""
