"""Deployment artefacts: Dockerfile, manifests/, RBAC proven on the apiserver."""
