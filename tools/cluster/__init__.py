"""A single-node Kubernetes cluster whose Pods run, built without Docker (``python -m tools.cluster``)."""
