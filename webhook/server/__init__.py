"""The HTTP shell: the Flask app (``/validate``, probes, metrics, the record API) and its TLS server."""
