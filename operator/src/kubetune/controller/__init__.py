"""The FineTuneJob operator: pure decision modules (fleet, placement, manifests, status) and the
thin kopf layer that reads the cluster and writes the result."""
