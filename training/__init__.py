"""Training, validation and registration of the triage CNNs (fastai + timm); demo models, not for clinical use."""
