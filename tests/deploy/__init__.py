"""docker/: the image, compose, Envoy and Kubernetes files."""
