"""The kubetune trainer: runs inside the pod the operator creates. Imports torch; the operator never imports this."""
