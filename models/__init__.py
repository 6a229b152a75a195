"""Base models as files on disk, shared by training and serving: the packaged offline model and hub checks."""
