"""Local test ground: a real Kubernetes control plane built from Go modules, a fake GPU fleet (KWOK),
an S3 server and, on request, Prometheus. Used by `kubetune dev` and the integration test fixtures.
"""
