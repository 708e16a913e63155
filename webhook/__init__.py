"""The admission webhook: InferenceService validation and Pod mutation (``gpushare webhook``)."""
