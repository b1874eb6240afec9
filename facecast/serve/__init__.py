"""The service plane: the HTTP app, the service and its streams, the ingest (nginx), the
web page, metrics, and the cluster's store and workers."""
