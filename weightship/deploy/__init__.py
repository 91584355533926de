"""Deployers: Kubernetes with Helm (:mod:`weightship.deploy.k8s`)."""
