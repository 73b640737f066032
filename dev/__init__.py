"""Developer tooling: the local Kubernetes control plane and the demo."""
