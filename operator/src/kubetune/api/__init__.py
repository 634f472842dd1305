"""The FineTuneJob API (kubetune.io/v1alpha1): pydantic models, CRD generation, validation."""
